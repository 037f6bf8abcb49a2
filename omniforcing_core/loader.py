"""Build an OmniForcing transformer from checkpoint files: base, optional overlay, strict checks.

Sizes come from tensor shapes. Head counts and connector geometry come from the header, from a known
architecture recognised by its full key/shape signature (LTX-2 19B), or from an explicit override
(`architecture=`); anything else is an error naming what is missing and how to give it. Conventions (one
complete `config.Conventions`, every field with its provenance) come from, field by field: an explicit
override, else the header of the file whose transformer runs (the overlay's if there is one, else the
base's), else a preset: the caller's (From Native MODEL: `comfyui`), else `omniforcing-student` for a
generator overlay or a header-less file (the released student's shards carry no header), else `ltx-core`
for a file with a foreign LTX-2 header (the base checkpoint run alone, as Lightricks' code runs it).
Weights are read tensor by tensor from memory-mapped files into a model built on the meta device,
so host memory peaks near one copy of the weights.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch

from .checkpoint import SAFETENSORS_DTYPES, CheckpointError, KeyMap, TensorRef, scan
from .config import (CONVENTION_FIELDS, DEFAULT_PRESET, KNOWN_ARCHITECTURES, PRESETS, ConnectorConfig, ModelConfig,
                     get_preset)
from .config import Conventions as ConventionValues
from .layout import BlockLayout, make_layout
from .model import OmniForcingTransformer
from .rope import RopeConfig

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn,
          "fp8_e5m2": torch.float8_e5m2}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
HEADER_CONVENTIONS = "omniforcing_conventions"  # our own header entry: the complete conventions, exactly
# LTX-style header keys that carry a convention: header key -> (field, how to read the value)
LTX_HEADER_KEYS = {
    "rope_type": ("rope_kind", lambda v: str(v).lower()),
    "frequencies_precision": ("rope_precision", lambda v: str(v).lower()),
    "av_ca_timestep_scale_multiplier": ("av_ca_timestep_scale_multiplier", float),
    "causal_temporal_positioning": ("causal_fix", bool),
    "use_middle_indices_grid": ("positions", lambda v: "middle" if v else "start"),
}
ARCHITECTURE_KEYS = ("video_heads", "video_head_dim", "audio_heads", "audio_head_dim", "connector_heads",
                     "connector_head_dim")
ARCHITECTURE_HELP = ("pass them: load_model(..., architecture={'video_heads': N, 'audio_heads': M, "
                     "'connector_heads': C}), `python -m omniforcing_core info --video-heads N --audio-heads M "
                     "--connector-heads C`, or the loader node's 'heads' widget ('video=N,audio=M,connector=C')")


def _architecture_help(missing: list[str]) -> str:
    """How to give exactly the head counts that are missing."""
    names = [n for n in ("video", "audio", "text connector") if any(m.startswith(n + " ") for m in missing)]
    keys = {"video": ("video_heads", "--video-heads", "video"), "audio": ("audio_heads", "--audio-heads", "audio"),
            "text connector": ("connector_heads", "--connector-heads", "connector")}
    k = [keys[n] for n in names]
    return (f"pass them: load_model(..., architecture={{{', '.join(repr(a) + ': N' for a, _, _ in k)}}}), "
            f"`python -m omniforcing_core info FILE {' '.join(f + ' N' for _, f, _ in k)}`, or the loader node's "
            f"'heads' widget ('{', '.join(w + '=N' for _, _, w in k)}')")


def as_dtype(value, what: str = "dtype") -> Optional[torch.dtype]:
    """A torch dtype, or its name (fp32, bf16, fp8_e4m3fn, float16, torch.bfloat16, ...), as a torch dtype;
    None and "default" (as stored) stay None. Anything else is an error naming the choices."""
    if value is None or value == "default":
        return None
    dt = value if isinstance(value, torch.dtype) else DTYPES.get(str(value).removeprefix("torch."))
    if dt not in DTYPES.values():
        raise ValueError(f"{what} '{value}' unknown; use a torch dtype or one of default, {', '.join(DTYPES)}")
    return dt


@dataclass(frozen=True)
class Conventions:
    """Resolved conventions: the complete `config.Conventions` (`values`) and where each field came from
    (`source`: field -> "override", "base header", "overlay header", or the preset's label). Fields read
    through: `conv.rope_kind` is `conv.values.rope_kind`."""

    values: ConventionValues
    source: Mapping[str, str] = field(default_factory=dict)
    based_on: str = DEFAULT_PRESET  # the preset the fields not set explicitly came from

    def __getattr__(self, name):
        if name != "values" and name in CONVENTION_FIELDS:
            return getattr(self.values, name)
        raise AttributeError(name)

    def describe(self) -> dict:
        """{field: {"value": ..., "from": ...}} plus the preset these equal (None: a custom mix)."""
        out = {k: {"value": v, "from": self.source.get(k, "?")} for k, v in self.values.as_dict().items()}
        return {"preset": self.values.preset, "based_on": self.based_on, "fields": out}

    def line(self) -> str:
        """One line for a node's info output."""
        name = self.values.preset or f"custom (based on {self.based_on})"
        parts = [f"{k}={v}" for k, v in self.values.as_dict().items()]
        return f"conventions {name}: " + ", ".join(parts)


@dataclass
class LoadReport:
    config: ModelConfig
    layout: BlockLayout
    conventions: Conventions
    base_prefix: str
    overlay_prefix: Optional[str]
    num_tensors: int
    num_params: int
    stored_dtypes: dict[str, int]
    weight_dtype: Optional[torch.dtype]  # Linear weights; None: as stored
    ignored: int
    compute_dtype: torch.dtype
    config_source: dict[str, str] = field(default_factory=dict)  # config value -> where it came from


def _header_transformer(km: Optional[KeyMap]) -> dict:
    cj = km.config_json() if km else None
    if not cj:
        return {}
    return cj.get("transformer", cj) if isinstance(cj, dict) else {}


def _conventions_from_header(h: dict) -> dict:
    """Convention fields a header states: our own complete entry, else the LTX-style keys it has."""
    own = h.get(HEADER_CONVENTIONS)
    if isinstance(own, dict):
        found = {k: v for k, v in own.items() if k in CONVENTION_FIELDS}
        return {k: _checked(f"{HEADER_CONVENTIONS}.{k}", v, k, v) for k, v in found.items()}
    return {f: _checked(k, h[k], f, _coerce(read, h[k])) for k, (f, read) in LTX_HEADER_KEYS.items() if k in h}


def _coerce(read, raw):
    try:
        return read(raw)
    except (TypeError, ValueError):
        return raw  # _checked names it


def _checked(key: str, raw, field: str, value):
    """A header is untrusted data: a convention value must be one of its field's choices (a number for
    numeric fields, a JSON true/false for flags), never coerced into one."""
    choices, _ = CONVENTION_FIELDS[field]
    flag = choices == (True, False)
    ok = (isinstance(raw, bool) if flag else
          value in choices if choices else
          isinstance(raw, (int, float)) and not isinstance(raw, bool) and raw == raw and raw > 0)
    if not ok:
        want = "true or false" if flag else (", ".join(map(str, choices)) if choices else "a positive number")
        raise CheckpointError(f"the checkpoint header's '{key}' is {raw!r}, not {want}; fix the file's config "
                              f"metadata or override the convention (loader node 'conventions' / "
                              f"'convention_overrides', info --preset/--convention)")
    return value


def _is_ltx_header(h: dict) -> bool:
    """A header written by Lightricks' tools (they state the positions; our headers from before the
    complete conventions entry had only rope_type / frequencies_precision / the gate multiplier)."""
    return "use_middle_indices_grid" in h or "causal_temporal_positioning" in h


def resolve_conventions(base: KeyMap, overlay: Optional[KeyMap], override: Optional[dict], *,
                        base_header: Optional[dict] = None,
                        default: Optional[tuple[str, str]] = None,
                        header_source: Optional[str] = None) -> Conventions:
    """The conventions to run the transformer under, each field with its provenance (module doc).

    override: {field: value or None (auto)} and optionally "preset": a preset name. `base_header`: the
    base's parsed `transformer` header when it is not in `base.metadata` (a model already in memory); by
    default the header is read from the file's metadata. `default`: (preset, label) a caller imposes
    when neither override nor header decides (From Native MODEL: ("comfyui", ...)); `header_source`: how
    to name the header in the provenance (default "base header" / "overlay header")."""
    override = {k: v for k, v in (override or {}).items() if v is not None and v != "auto"}
    unknown = sorted(set(override) - set(CONVENTION_FIELDS) - {"preset"})
    if unknown:
        raise ValueError(f"unknown convention override(s) {unknown}; known: preset, {', '.join(CONVENTION_FIELDS)}")
    if overlay is not None:  # the overlay's transformer runs: the base header describes the base's training
        header, where = _header_transformer(overlay), "overlay header"
    else:
        header, where = (base_header if base_header is not None else _header_transformer(base)), "base header"
    where = header_source or where
    from_header = _conventions_from_header(header)
    if "preset" in override:
        preset, label = override["preset"], "override (preset)"
    elif isinstance(header.get(HEADER_CONVENTIONS), dict) and header[HEADER_CONVENTIONS].get("preset") in PRESETS:
        preset, label = header[HEADER_CONVENTIONS]["preset"], where
    elif default is not None:
        preset, label = default
    elif overlay is not None:
        preset, label = DEFAULT_PRESET, "OmniForcing student default"
    elif _is_ltx_header(header):
        preset, label = "ltx-core", "ltx-core preset (foreign LTX-2 header)"
    else:
        preset, label = DEFAULT_PRESET, "default"
    vals = get_preset(preset).as_dict()
    src = {k: label for k in vals}
    for layer, d in ((where, from_header), ("override", {k: v for k, v in override.items() if k != "preset"})):
        for k, v in d.items():
            vals[k], src[k] = v, layer
    return Conventions(ConventionValues(**vals), src, preset)


def _shape(refs: dict[str, TensorRef], key: str, src: str) -> tuple[int, ...]:
    if key not in refs:
        raise CheckpointError(f"{src}: missing '{key}', which every LTX-2 transformer has")
    return refs[key].shape


@functools.lru_cache(maxsize=None)
def _signature(name: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of a known architecture (built on the meta device: no memory)."""
    with torch.device("meta"):
        m = OmniForcingTransformer(KNOWN_ARCHITECTURES[name])
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def recognise_architecture(refs: Mapping[str, TensorRef]) -> Optional[str]:
    """The known architecture whose full key/shape signature these tensors have (text connectors and audio
    sink tokens optional), or None."""
    have = {k: tuple(r.shape) for k, r in refs.items() if k != "audio_sink_tokens"}
    for name, cfg in KNOWN_ARCHITECTURES.items():
        if have.get("patchify_proj.weight") != (cfg.video_dim, cfg.in_channels) or \
                f"transformer_blocks.{cfg.num_layers - 1}.attn1.to_q.weight" not in have:
            continue  # cheap mismatch: no need to build the signature
        sig = _signature(name)
        conn = {k for k in sig if k.startswith(("video_embeddings_connector.", "audio_embeddings_connector."))}
        want = {k: v for k, v in sig.items() if k not in conn or any(h in conn for h in have)}
        sinks = refs.get("audio_sink_tokens")
        if have == want and (sinks is None or tuple(sinks.shape[::2]) == (1, sig["audio_patchify_proj.weight"][0])):
            return name
    return None


def _split(width: int, what: str, heads_key: str, dim_key: str, header: dict, override: dict,
           known: Optional[tuple[str, int]], src: str, sources: dict, out_heads: str, out_dim: str,
           missing: list, header_name: str = "header") -> tuple[int, int]:
    """heads x head_dim = width, from the override, the header, or a known architecture ((name, heads));
    when none states them, noted in `missing` (the caller raises one error naming everything missing)."""
    for name, vals in (("override", (override.get(out_heads), override.get(out_dim))),
                       (header_name, (header.get(heads_key), header.get(dim_key))),
                       (f"known architecture {known[0]}" if known else "", (known[1] if known else None, None))):
        bad = [v for v in vals if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0)]
        if bad:  # a header is untrusted data: '32' or [32] is not a head count
            raise CheckpointError(f"{src}: the {name or 'given'} {what} head count / head dim {vals[0]!r} x "
                                  f"{vals[1]!r} are not positive whole numbers; {ARCHITECTURE_HELP}")
        heads, dim = vals
        if heads is None and dim is None:
            continue
        if heads is None:
            heads = width // dim if dim and width % dim == 0 else None
        if dim is None:
            dim = width // heads if heads and width % heads == 0 else None
        if not heads or not dim or heads * dim != width:
            raise CheckpointError(f"{src}: {what} heads x head_dim from the {name} ({vals[0]} x {vals[1]}) do not "
                                  f"make its width {width}; {ARCHITECTURE_HELP}")
        sources[out_heads] = sources[out_dim] = name
        return heads, dim
    missing.append(f"{what} head count (width {width})")
    return 0, 0


def describe_config(km: KeyMap, conventions: Conventions | ConventionValues, src: str = "checkpoint", *,
                    header: Optional[dict] = None, architecture: Optional[dict] = None,
                    connector_header: Optional[dict] = None,
                    header_source: str = "header") -> tuple[ModelConfig, dict[str, str]]:
    """The model config of a checkpoint and where each value came from ({field: source}).

    Sizes from shapes; head counts and connector geometry from `architecture` (an explicit override:
    video_heads, audio_heads, connector_heads and/or the *_head_dim), the header, or a recognised
    architecture, else an error naming them. `header`: the parsed `transformer` header when it is not
    in `km.metadata`. `connector_header`: the header of the file the connectors come from (default: the same).
    `header_source`: how the provenance names the header (From Native MODEL: "native model")."""
    conv = conventions.values if isinstance(conventions, Conventions) else conventions
    refs = km.refs
    h = header if header is not None else _header_transformer(km)
    ch = h if connector_header is None else connector_header
    over = {k: v for k, v in (architecture or {}).items() if v is not None}
    bad = sorted(set(over) - set(ARCHITECTURE_KEYS))
    if bad:
        raise ValueError(f"unknown architecture override(s) {bad}; known: {', '.join(ARCHITECTURE_KEYS)}")
    sources: dict[str, str] = {}
    dv, cin = _shape(refs, "patchify_proj.weight", src)
    da, cain = _shape(refs, "audio_patchify_proj.weight", src)
    cap = _shape(refs, "caption_projection.linear_1.weight", src)[1]
    layers = 1 + max(int(m.group(1)) for k in refs if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    ff = _shape(refs, "transformer_blocks.0.ff.net.0.proj.weight", src)[0] // dv
    sinks = refs["audio_sink_tokens"].shape[1] if "audio_sink_tokens" in refs else 0
    for k in ("in_channels", "audio_in_channels", "caption_channels", "num_layers", "ff_mult", "num_audio_sinks"):
        sources[k] = "tensor shapes"
    needed = ["num_attention_heads", "audio_num_attention_heads"]
    if "video_embeddings_connector.learnable_registers" in refs:
        needed.append("connector_num_attention_heads" if "connector_attention_head_dim" not in ch
                      else "connector_attention_head_dim")
    arch = recognise_architecture(refs) if not all(k in (ch if k.startswith("connector") else h) for k in needed) \
        else None
    known = (arch, KNOWN_ARCHITECTURES[arch]) if arch else None
    missing: list[str] = []
    vh, vhd = _split(dv, "video", "num_attention_heads", "attention_head_dim", h, over,
                     (arch, known[1].video_heads) if known else None, src, sources, "video_heads", "video_head_dim",
                     missing, header_source)
    ah, ahd = _split(da, "audio", "audio_num_attention_heads", "audio_attention_head_dim", h, over,
                     (arch, known[1].audio_heads) if known else None, src, sources, "audio_heads", "audio_head_dim",
                     missing, header_source)
    connectors = None
    if "video_embeddings_connector.learnable_registers" in refs:
        regs, cdim = refs["video_embeddings_connector.learnable_registers"].shape
        clayers = 1 + max(int(m.group(1)) for k in refs
                          if (m := re.match(r"video_embeddings_connector\.transformer_1d_blocks\.(\d+)\.", k)))
        a_regs = refs.get("audio_embeddings_connector.learnable_registers")
        if a_regs is None or tuple(a_regs.shape) != (regs, cdim):
            raise CheckpointError(f"{src}: the audio text connector differs from the video one (registers "
                                  f"{None if a_regs is None else tuple(a_regs.shape)} vs {(regs, cdim)}); separate "
                                  f"connector geometries (LTX-2.3) are not supported")
        known_c = (arch, known[1].connectors.heads) if known and known[1].connectors else None
        cheads, chd = _split(cdim, "text connector", "connector_num_attention_heads", "connector_attention_head_dim",
                             ch, over, known_c, src, sources, "connector_heads", "connector_head_dim", missing,
                             header_source)
        comfy = conv.rope_arithmetic == "comfyui"
        # ComfyUI and ltx-core: the connectors follow the header's rope_type, split when it has none
        c_kind = str(ch.get("connector_rope_type", ch.get("rope_type", "split"))).lower()
        c_prec = "float64" if comfy else str(ch.get("frequencies_precision", "float64")).lower()
        c_max = ch.get("connector_positional_embedding_max_pos", [4096.0])
        c_max = 4096.0 if comfy else float(c_max[0] if isinstance(c_max, (list, tuple)) else c_max)
        connectors = ConnectorConfig(num_layers=clayers, heads=cheads, head_dim=chd, num_registers=regs,
                                     rope_kind=c_kind, rope_precision=c_prec, max_pos=c_max)
        sources["connector_layers"] = sources["connector_registers"] = "tensor shapes"
        sources["connector_rope"] = (header_source if "rope_type" in ch or "connector_rope_type" in ch else
                                     "LTX-2 default (split)") + \
            (", float64 grid and max_pos 4096 (ComfyUI always)" if comfy else "")
    if missing:
        raise CheckpointError(f"{src}: cannot determine the {' and '.join(missing)}: the header does not state them "
                              f"and the keys/shapes are not a known architecture ({', '.join(KNOWN_ARCHITECTURES)}); "
                              f"{_architecture_help(missing)}")

    def pick(key, default, what):
        if key in h:
            sources[what] = header_source
            return h[key]
        sources[what] = "LTX-2 default"
        return default

    max_pos = tuple(float(x) for x in pick("positional_embedding_max_pos", (20, 2048, 2048), "rope_max_pos"))
    a_max = float(pick("audio_positional_embedding_max_pos", [20], "rope_audio_max_pos")[0])
    theta = float(pick("positional_embedding_theta", 10000.0, "rope_theta"))
    ts = float(pick("timestep_scale_multiplier", 1000.0, "timestep_scale_multiplier"))
    rope = RopeConfig(conv.rope_kind, conv.rope_precision, theta, max_pos, a_max, arithmetic=conv.rope_arithmetic,
                      causal_fix=conv.causal_fix, positions=conv.positions)
    cfg = ModelConfig(num_layers=layers, video_heads=vh, video_head_dim=vhd, audio_heads=ah, audio_head_dim=ahd,
                      in_channels=cin, audio_in_channels=cain, caption_channels=cap, ff_mult=ff,
                      timestep_scale_multiplier=ts, rope=rope, num_audio_sinks=sinks,
                      connectors=connectors).with_conventions(conv)
    return cfg, sources


def infer_config(km: KeyMap, conventions: Conventions | ConventionValues, src: str = "checkpoint", *,
                 header: Optional[dict] = None, architecture: Optional[dict] = None) -> ModelConfig:
    """`describe_config` without the provenance."""
    return describe_config(km, conventions, src, header=header, architecture=architecture)[0]


def header_for(config: ModelConfig) -> dict:
    """The LTX-style header `config.transformer` entry that describes a model (for files we write): head
    counts, the LTX keys ComfyUI and ltx-core read, and our complete conventions under
    `omniforcing_conventions` (read back exactly by `resolve_conventions`)."""
    c = config
    conv = c.conventions
    h = {"num_attention_heads": c.video_heads, "attention_head_dim": c.video_head_dim,
         "audio_num_attention_heads": c.audio_heads, "audio_attention_head_dim": c.audio_head_dim,
         "rope_type": c.rope.kind, "frequencies_precision": c.rope.precision,
         "av_ca_timestep_scale_multiplier": c.av_ca_timestep_scale_multiplier,
         "causal_temporal_positioning": c.rope.causal_fix, "use_middle_indices_grid": c.rope.positions == "middle",
         "timestep_scale_multiplier": c.timestep_scale_multiplier, "positional_embedding_theta": c.rope.theta,
         "positional_embedding_max_pos": list(c.rope.max_pos),
         "audio_positional_embedding_max_pos": [c.rope.audio_max_pos],
         HEADER_CONVENTIONS: {**conv.as_dict(), "preset": conv.preset}}
    if c.connectors:
        h["connector_attention_head_dim"] = c.connectors.head_dim
        h["connector_num_attention_heads"] = c.connectors.heads
    return h


def _diff_message(kind: str, src: str, prefix: str, missing: list[str], unexpected: list[str]) -> str:
    lines = [f"{kind} {src} (key prefix seen: '{prefix or '<none>'}') does not match the model:"]
    if missing:
        lines.append(f"  {len(missing)} missing, first: {missing[:5]}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected, first: {unexpected[:5]}")
    heads = {k.split(".", 1)[0] for k in unexpected if "." in k}
    if unexpected and len(heads) == 1:
        extra = heads.pop() + "."
        if any(k[len(extra):] in missing for k in unexpected):
            lines.append(f"  the keys carry an extra prefix '{prefix}{extra}'; re-save without it")
    lines.append("  is it a transformer checkpoint of the same size? (the official loader silently keeps base "
                 "weights in this case; we refuse)")
    return "\n".join(lines)


def _compute_dtype(requested: Optional[torch.dtype], wdt: Optional[torch.dtype], stored: dict[str, int]) -> torch.dtype:
    """Explicit choice, else the weight dtype, else the most common stored float dtype (bf16 for fp8)."""
    if requested is not None:
        return requested
    if wdt is not None and wdt not in FP8:
        return wdt
    floats = {SAFETENSORS_DTYPES.get(d, getattr(torch, d.replace("torch.", ""), None)): n for d, n in stored.items()}
    floats = {d: n for d, n in floats.items() if d is not None and d.is_floating_point and d not in FP8}
    if wdt in FP8 or not floats:
        return torch.bfloat16
    return max(floats, key=floats.get)


def _refuse_non_float(chosen: dict, want: dict) -> None:
    """Integer/bool (or unreadable float) tensors for the model's float parameters: refused, never cast."""
    bad: dict = {}
    for k, (ref, _) in chosen.items():
        dt = SAFETENSORS_DTYPES.get(ref.dtype, getattr(torch, ref.dtype.replace("torch.", ""), None))
        if want[k].is_floating_point() and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
            bad.setdefault(ref.file, []).append(f"{ref.key} ({ref.dtype})")
    if bad:
        n = sum(len(v) for v in bad.values())
        where = "; ".join(f"{f}: {', '.join(v[:5])}{' ...' if len(v) > 5 else ''}" for f, v in bad.items())
        raise CheckpointError(f"{n} tensor{'s' if n != 1 else ''} stored as a non-floating-point dtype where the "
                              f"model has floating-point parameters ({where}); they are not cast silently: "
                              f"re-save them as F32/BF16/F16 (or F8_E4M3/F8_E5M2), or load the file they came from")


def _warn_non_finite(state: dict, chosen: dict) -> None:
    """One isfinite pass over the loaded weights, one sync; NaN/Inf weights warn (they load as stored)."""
    import warnings

    keys = [k for k, t in state.items() if t.is_floating_point()]
    if not keys:
        return
    ok = torch.stack([torch.isfinite(state[k].to(torch.float16) if state[k].dtype in FP8 else state[k]).all()
                      for k in keys]).tolist()
    bad = [chosen[k][0] for k, good in zip(keys, ok) if not good]
    if bad:
        files = sorted({str(r.file) for r in bad})
        warnings.warn(f"{len(bad)} tensor{'s' if len(bad) != 1 else ''} hold NaN or Inf values, first: "
                      f"{', '.join(r.key for r in bad[:5])} (in {', '.join(files[:3])}); whatever uses them will "
                      f"output NaN: re-download the file, or check the training run that wrote it",
                      RuntimeWarning, stacklevel=3)


def _read(key: str, ref: TensorRef, km: KeyMap, handles: dict) -> torch.Tensor:
    if km.pickled is not None and ref.file.suffix != ".safetensors":
        return km.pickled[key]
    from safetensors import safe_open

    f = handles.get(ref.file)
    if f is None:
        try:
            f = handles[ref.file] = safe_open(str(ref.file), framework="pt", device="cpu")
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{ref.file}: cannot be opened as safetensors ({e}); re-download it") from None
    try:
        return f.get_tensor(ref.key)
    except Exception as e:  # noqa: BLE001 - the file changed or is damaged past what its header shows
        raise CheckpointError(f"{ref.file}: tensor '{ref.key}' cannot be read ({e}); re-download the file") from None


def _is_linear_weight(model: torch.nn.Module, key: str) -> bool:
    mod_name, _, leaf = key.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(mod_name), torch.nn.Linear)


def load_model(base: os.PathLike | str, overlay: os.PathLike | str | None = None, *,
               weight_dtype: torch.dtype | str | None = None, compute_dtype: torch.dtype | str | None = None,
               device="cpu",
               operations=None, conventions: Optional[dict] = None, layout: Optional[str] = None,
               drop_sinks: bool = False, allow_partial_overlay: bool = False,
               allow_pickle: bool = False, config: Optional[ModelConfig] = None,
               dry_run: bool = False, architecture: Optional[dict] = None) -> tuple[OmniForcingTransformer, LoadReport]:
    """Load base weights, overlay a distilled generator on top, and return the model + what was done.

    weight_dtype: None (as stored), float32/bfloat16/float16, or float8_e4m3fn/float8_e5m2 (Linear weights
    stored in fp8 and upcast at compute). compute_dtype defaults to the weight dtype (bf16 for fp8).
    Both take a torch dtype or its name (`as_dtype`: "fp8_e4m3fn", "bf16", "default", ...).
    dry_run: every check that needs no tensor data (what `info` runs), nothing read; the model stays on meta.
    conventions: {field: value} overrides and/or "preset" (`resolve_conventions`); architecture: head-count
    overrides for files whose header does not state them (`describe_config`).
    """
    wdt, requested_cdt = as_dtype(weight_dtype, "weight_dtype"), as_dtype(compute_dtype, "compute_dtype")
    bkm = scan(base, allow_pickle)
    okm = scan(overlay, allow_pickle) if overlay is not None else None
    conv = resolve_conventions(bkm, okm, conventions)
    if config is not None:  # explicit shapes: the whole config is the caller's, conventions as resolved
        cfg, sources = config.with_conventions(conv.values), {"all": "explicit config"}
    else:
        cfg, sources = describe_config(bkm, conv, str(base), architecture=architecture)
    if drop_sinks and cfg.num_audio_sinks:
        cfg = cfg.replace(num_audio_sinks=0)
    with torch.device("meta"):
        model = OmniForcingTransformer(cfg, operations=operations)
    want = dict(model.state_dict())
    base_refs = {k: v for k, v in bkm.refs.items() if not (drop_sinks and k == "audio_sink_tokens")}
    unexpected = sorted(set(base_refs) - set(want))
    missing = sorted(set(want) - set(base_refs))
    if unexpected or missing:
        raise CheckpointError(_diff_message("base checkpoint", str(base), bkm.prefix, missing, unexpected))
    chosen: dict[str, tuple[TensorRef, KeyMap]] = {k: (r, bkm) for k, r in base_refs.items()}
    if okm is not None:
        o_refs = {k: v for k, v in okm.refs.items() if not (k == "audio_sink_tokens" and not cfg.num_audio_sinks)}
        o_unexp = sorted(set(o_refs) - set(want))
        # the released generator is transformer-only: connectors may come from the base
        o_missing = sorted(k for k in set(want) - set(o_refs) if not k.startswith(("video_embeddings_connector.",
                                                                                   "audio_embeddings_connector.")))
        if o_unexp or (o_missing and not allow_partial_overlay):
            raise CheckpointError(_diff_message("overlay", str(overlay), okm.prefix, o_missing, o_unexp))
        for k, r in o_refs.items():
            if tuple(r.shape) != tuple(want[k].shape):
                raise CheckpointError(f"overlay {overlay}: '{k}' has shape {r.shape}, the base has {tuple(want[k].shape)}")
            chosen[k] = (r, okm)
    stored_counts: dict[str, int] = {}
    for ref, _ in chosen.values():
        stored_counts[ref.dtype] = stored_counts.get(ref.dtype, 0) + 1
    cdt = _compute_dtype(requested_cdt, wdt, stored_counts)
    handles: dict = {}
    state = {}
    _refuse_non_float(chosen, want)
    for k, (ref, km) in chosen.items():
        if tuple(ref.shape) != tuple(want[k].shape):
            raise CheckpointError(f"{ref.file}: '{ref.key}' has shape {ref.shape}, the model expects "
                                  f"{tuple(want[k].shape)}")
        if dry_run:
            state[k] = want[k]
            continue
        t = _read(k, ref, km, handles)
        lin = _is_linear_weight(model, k)
        # Linear weights as asked (or as stored; fp8 is upcast per layer at compute); every other
        # tensor (tables, norms, sinks) in the compute dtype, so the model's dtype is its compute dtype
        target = (wdt or t.dtype) if lin else cdt
        state[k] = t.to(device=device, dtype=target)
    model.load_state_dict(state, assign=True, strict=True)
    if not dry_run:
        _warn_non_finite(state, chosen)
    model.eval().requires_grad_(False)
    lay_kind = layout or ("prefix" if cfg.num_audio_sinks else "v2")
    lay = make_layout(lay_kind, num_sinks=cfg.num_audio_sinks)
    model.check_layout(lay)
    report = LoadReport(cfg, lay, conv, bkm.prefix, okm.prefix if okm else None, len(state),
                        sum(t.numel() for t in state.values()), stored_counts, wdt,
                        len(bkm.ignored) + (len(okm.ignored) if okm else 0), cdt, sources)
    return model, report


