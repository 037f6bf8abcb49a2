"""Command line: `python -m omniforcing_core {keys,info,demo,bench}`."""
from __future__ import annotations

import argparse
import json
import signal
import sys
import time

import torch

from .argtypes import whole_number

from .config import PRESETS as _PRESETS

PRESET_NAMES = tuple(_PRESETS)


def cmd_keys(args) -> int:
    from .config import get_config
    from .model import OmniForcingTransformer

    cfg = get_config(args.config)
    if args.sinks:
        cfg = cfg.replace(num_audio_sinks=args.sinks)
    with torch.device("meta"):  # shapes only: no memory for 19B parameters
        model = OmniForcingTransformer(cfg)
    keys = {args.prefix + k: list(v.shape) for k, v in model.state_dict().items()}
    json.dump(keys, sys.stdout, indent=None if args.compact else 1)
    print()
    print(f"# {len(keys)} tensors, {sum(_numel(s) for s in keys.values()):,} parameters", file=sys.stderr)
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _architecture_args(args) -> dict:
    return {k: v for k, v in (("video_heads", args.video_heads), ("audio_heads", args.audio_heads),
                              ("connector_heads", args.connector_heads)) if v is not None}


def _convention_args(args) -> dict:
    out = {"preset": args.preset} if args.preset else {}
    for item in args.convention or []:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--convention takes field=value, got '{item}'")
        out[k.strip()] = {"true": True, "false": False}.get(v.strip().lower(), _number_or_text(v.strip()))
    return out


def _number_or_text(v: str):
    try:
        return float(v)
    except ValueError:
        return v


def cmd_info(args) -> int:
    from .checkpoint import scan
    from .loader import load_model, recognise_architecture

    if len(args.paths) > 2:
        print("info takes a base checkpoint and optionally an overlay", file=sys.stderr)
        return 2
    # the loader's own checks, exactly, without reading tensor data: what it refuses, info refuses
    _, rep = load_model(args.paths[0], args.paths[1] if len(args.paths) > 1 else None,
                        allow_pickle=args.allow_pickle, dry_run=True, conventions=_convention_args(args),
                        architecture=_architecture_args(args))
    base = scan(args.paths[0], args.allow_pickle)
    over = scan(args.paths[1], args.allow_pickle) if len(args.paths) > 1 else None
    conv, cfg = rep.conventions, rep.config
    dtypes: dict[str, int] = {}
    for r in base.refs.values():
        dtypes[r.dtype] = dtypes.get(r.dtype, 0) + 1
    src = rep.config_source
    info = {
        "files": sorted({str(r.file) for r in base.refs.values()}),
        "key_prefix": base.prefix or "<none>",
        "tensors": len(base.refs),
        "parameters": sum(r.numel() for r in base.refs.values()),
        "ignored_tensors": len(base.ignored),
        "dtypes": dtypes,
        "header_config": base.config_json() is not None,
        "known_architecture": recognise_architecture(base.refs),
        "layout": "prefix" if cfg.num_audio_sinks else "v2",
        "audio_sink_tokens": cfg.num_audio_sinks,
        "layers": cfg.num_layers,
        "video": f"{cfg.video_heads}x{cfg.video_head_dim}={cfg.video_dim}",
        "audio": f"{cfg.audio_heads}x{cfg.audio_head_dim}={cfg.audio_dim}",
        "caption_channels": cfg.caption_channels,
        "text_connectors": (f"{cfg.connectors.num_layers} layers, {cfg.connectors.heads}x{cfg.connectors.head_dim}, "
                            f"{cfg.connectors.num_registers} registers, rope {cfg.connectors.rope_kind}/"
                            f"{cfg.connectors.rope_precision}" if cfg.connectors else None),
        "config_from": {"heads": {"video": src.get("video_heads"), "audio": src.get("audio_heads"),
                                  **({"text connector": src.get("connector_heads")} if cfg.connectors else {})},
                        **{k: v for k, v in src.items() if not k.endswith(("_heads", "_head_dim"))}},
        "conventions": {"preset": conv.values.preset, "based_on": conv.based_on, "rope": conv.rope_kind,
                        **conv.values.as_dict(), "from": dict(conv.source)},
    }
    if over is not None:
        info["overlay"] = {"files": sorted({str(r.file) for r in over.refs.values()}),
                           "key_prefix": over.prefix or "<none>", "tensors": len(over.refs),
                           "header_config": over.config_json() is not None}
    print(json.dumps(info, indent=1))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m omniforcing_core", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("keys", help="print {key: shape} of a config as JSON (no weights allocated)")
    k.add_argument("--config", default="ltx2-19b")
    k.add_argument("--prefix", default="", help="e.g. model.diffusion_model.")
    k.add_argument("--sinks", type=whole_number(0), default=0, help="add audio sink tokens (v1 checkpoints)")
    k.add_argument("--compact", action="store_true")
    k.set_defaults(fn=cmd_keys)
    i = sub.add_parser("info", help="detected layout, conventions, parameter count and dtypes of checkpoint(s)")
    i.add_argument("paths", nargs="+", help="base checkpoint [overlay]: file, *.index.json or folder")
    i.add_argument("--allow-pickle", action="store_true", help="read .pt/.ckpt with torch.load(weights_only=True)")
    i.add_argument("--video-heads", type=int, help="video attention heads, for files whose header does not say")
    i.add_argument("--audio-heads", type=int, help="audio (and cross-modal) attention heads, likewise")
    i.add_argument("--connector-heads", type=int, help="text connector attention heads, likewise")
    i.add_argument("--preset", choices=sorted(PRESET_NAMES), help="conventions preset to run the weights under "
                   "(default: the header's, else omniforcing-student for a generator, else ltx-core for an "
                   "LTX-2 header)")
    i.add_argument("--convention", action="append", metavar="FIELD=VALUE",
                   help="override one convention field (repeatable), e.g. gate_timestep=own")
    i.set_defaults(fn=cmd_info)
    from . import demo as _demo, bench as _bench
    _demo.add_parser(sub)
    _bench.add_parser(sub)
    args = p.parse_args(argv)
    from .budget import ResourceError
    from .media import MediaError
    from .sampling import NonFiniteError

    restore = _sigterm_as_interrupt()
    started = time.monotonic()
    try:
        return args.fn(args)
    except KeyboardInterrupt as e:
        # Ctrl-C or SIGTERM: the command has already closed its files on the way out (the demo's
        # streamer ends the MP4 on a whole fragment and the playlist with #EXT-X-ENDLIST)
        name, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("SIGINT", 130)
        out = getattr(args, "out", None)
        where = f"; the files in {out} are closed and playable" if out else ""
        print(f"stopped by {name} after {time.monotonic() - started:.1f} s{where}", file=sys.stderr)
        return code
    except (MediaError, ResourceError, NonFiniteError) as e:  # the run itself could not go on
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        restore()


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered like Ctrl-C so `finally:` blocks close files; exit status 143."""


def _sigterm_as_interrupt():
    """Install a SIGTERM handler raising Terminated (unless one is set already); returns the undo."""
    def on_term(signum, frame):
        raise Terminated()

    try:
        if signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
            return lambda: None
        previous = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: signals are not ours to handle
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)
