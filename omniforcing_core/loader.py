"""Build an OmniForcing transformer from checkpoint files: base, optional overlay, strict checks.

Order of truth for the config: sizes come from tensor shapes; conventions (RoPE layout, frequency
precision, cross-modal gate multiplier) come from an explicit override, else the overlay's header,
else the released OmniForcing student's conventions when an overlay is given (its shards carry no
header and it was trained interleaved / float32 / gate x1), else the base header, else defaults.
Weights are read tensor by tensor from memory-mapped files into a model built on the meta device,
so host memory peaks near one copy of the weights.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from .checkpoint import SAFETENSORS_DTYPES, CheckpointError, KeyMap, TensorRef, scan
from .config import ConnectorConfig, ModelConfig
from .layout import BlockLayout, make_layout
from .model import OmniForcingTransformer
from .rope import RopeConfig

STUDENT_CONVENTIONS = {"rope_kind": "interleaved", "rope_precision": "float32", "av_ca_timestep_scale_multiplier": 1.0}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16, "fp8_e4m3fn": torch.float8_e4m3fn,
          "fp8_e5m2": torch.float8_e5m2}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def as_dtype(value, what: str = "dtype") -> Optional[torch.dtype]:
    """A torch dtype, or its name (fp32, bf16, fp8_e4m3fn, float16, torch.bfloat16, ...), as a torch dtype;
    None and "default" (as stored) stay None. Anything else is an error naming the choices."""
    if value is None or value == "default":
        return None
    dt = value if isinstance(value, torch.dtype) else DTYPES.get(str(value).removeprefix("torch."))
    if dt not in DTYPES.values():
        raise ValueError(f"{what} '{value}' unknown; use a torch dtype or one of default, {', '.join(DTYPES)}")
    return dt


@dataclass
class Conventions:
    rope_kind: str
    rope_precision: str
    av_ca_timestep_scale_multiplier: float
    source: dict[str, str] = field(default_factory=dict)  # field -> where it came from


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


def _header_transformer(km: Optional[KeyMap]) -> dict:
    cj = km.config_json() if km else None
    if not cj:
        return {}
    return cj.get("transformer", cj) if isinstance(cj, dict) else {}


def _conventions_from_header(h: dict) -> dict:
    out = {}
    if "rope_type" in h:
        out["rope_kind"] = str(h["rope_type"]).lower()
    if "frequencies_precision" in h:
        out["rope_precision"] = str(h["frequencies_precision"]).lower()
    if "av_ca_timestep_scale_multiplier" in h:
        out["av_ca_timestep_scale_multiplier"] = float(h["av_ca_timestep_scale_multiplier"])
    return out


def resolve_conventions(base: KeyMap, overlay: Optional[KeyMap], override: Optional[dict], *,
                        base_header: Optional[dict] = None) -> Conventions:
    """`base_header`: the base's parsed `transformer` header when it is not in `base.metadata` (a model
    already in memory); by default the header is read from the file's metadata."""
    layers = [("override", override or {}), ("overlay header", _conventions_from_header(_header_transformer(overlay)))]
    if overlay is not None:
        layers.append(("OmniForcing student default", STUDENT_CONVENTIONS))
    h = base_header if base_header is not None else _header_transformer(base)
    layers += [("base header", _conventions_from_header(h)),
               ("default", STUDENT_CONVENTIONS)]
    vals, src = {}, {}
    for name, d in layers:
        for k, v in d.items():
            if k not in vals and v is not None:
                vals[k], src[k] = v, name
    return Conventions(vals["rope_kind"], vals["rope_precision"], float(vals["av_ca_timestep_scale_multiplier"]), src)


def _shape(refs: dict[str, TensorRef], key: str, src: str) -> tuple[int, ...]:
    if key not in refs:
        raise CheckpointError(f"{src}: missing '{key}', which every LTX-2 transformer has")
    return refs[key].shape


def infer_config(km: KeyMap, conventions: Conventions, src: str = "checkpoint", *,
                 header: Optional[dict] = None) -> ModelConfig:
    """Sizes from shapes; head counts from the header when present (else LTX-2's 32 heads). `header`: the
    parsed `transformer` header, when it is not in `km.metadata` (by default it is read from there)."""
    refs = km.refs
    h = header if header is not None else _header_transformer(km)
    dv, cin = _shape(refs, "patchify_proj.weight", src)
    da, cain = _shape(refs, "audio_patchify_proj.weight", src)
    cap = _shape(refs, "caption_projection.linear_1.weight", src)[1]
    layers = 1 + max(int(m.group(1)) for k in refs if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    vh = int(h.get("num_attention_heads", 32))
    vhd = int(h.get("attention_head_dim", dv // vh))
    ah = int(h.get("audio_num_attention_heads", 32))
    ahd = int(h.get("audio_attention_head_dim", da // ah))
    if vh * vhd != dv or ah * ahd != da:
        raise CheckpointError(f"{src}: heads x head_dim ({vh}x{vhd}, {ah}x{ahd}) do not match widths ({dv}, {da})")
    ff = _shape(refs, "transformer_blocks.0.ff.net.0.proj.weight", src)[0] // dv
    sinks = refs["audio_sink_tokens"].shape[1] if "audio_sink_tokens" in refs else 0
    connectors = None
    if "video_embeddings_connector.learnable_registers" in refs:
        regs, cdim = refs["video_embeddings_connector.learnable_registers"].shape
        clayers = 1 + max(int(m.group(1)) for k in refs
                          if (m := re.match(r"video_embeddings_connector\.transformer_1d_blocks\.(\d+)\.", k)))
        chd = int(h.get("connector_attention_head_dim", 128 if cdim % 128 == 0 else cdim))
        chd = chd if cdim % chd == 0 else cdim
        # connectors belong to the text side: they follow the base header's RoPE layout (LTX-2: split)
        connectors = ConnectorConfig(num_layers=clayers, heads=cdim // chd, head_dim=chd, num_registers=regs,
                                     rope_kind=str(h.get("rope_type", "split")).lower())
    max_pos = tuple(float(x) for x in h.get("positional_embedding_max_pos", (20, 2048, 2048)))
    a_max = float(h.get("audio_positional_embedding_max_pos", [20])[0])
    rope = RopeConfig(conventions.rope_kind, conventions.rope_precision,
                      float(h.get("positional_embedding_theta", 10000.0)), max_pos, a_max)
    return ModelConfig(num_layers=layers, video_heads=vh, video_head_dim=vhd, audio_heads=ah, audio_head_dim=ahd,
                       in_channels=cin, audio_in_channels=cain, caption_channels=cap, ff_mult=ff,
                       timestep_scale_multiplier=float(h.get("timestep_scale_multiplier", 1000.0)),
                       av_ca_timestep_scale_multiplier=conventions.av_ca_timestep_scale_multiplier,
                       rope=rope, num_audio_sinks=sinks, connectors=connectors)


def header_for(config: ModelConfig) -> dict:
    """The LTX-style header `config.transformer` entry that describes a model (for files we write)."""
    c = config
    h = {"num_attention_heads": c.video_heads, "attention_head_dim": c.video_head_dim,
         "audio_num_attention_heads": c.audio_heads, "audio_attention_head_dim": c.audio_head_dim,
         "rope_type": c.rope.kind, "frequencies_precision": c.rope.precision,
         "av_ca_timestep_scale_multiplier": c.av_ca_timestep_scale_multiplier,
         "timestep_scale_multiplier": c.timestep_scale_multiplier, "positional_embedding_theta": c.rope.theta,
         "positional_embedding_max_pos": list(c.rope.max_pos),
         "audio_positional_embedding_max_pos": [c.rope.audio_max_pos]}
    if c.connectors:
        h["connector_attention_head_dim"] = c.connectors.head_dim
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
               dry_run: bool = False) -> tuple[OmniForcingTransformer, LoadReport]:
    """Load base weights, overlay a distilled generator on top, and return the model + what was done.

    weight_dtype: None (as stored), float32/bfloat16/float16, or float8_e4m3fn/float8_e5m2 (Linear weights
    stored in fp8 and upcast at compute). compute_dtype defaults to the weight dtype (bf16 for fp8).
    Both take a torch dtype or its name (`as_dtype`: "fp8_e4m3fn", "bf16", "default", ...).
    dry_run: every check that needs no tensor data (what `info` runs), nothing read; the model stays on meta.
    """
    wdt, requested_cdt = as_dtype(weight_dtype, "weight_dtype"), as_dtype(compute_dtype, "compute_dtype")
    bkm = scan(base, allow_pickle)
    okm = scan(overlay, allow_pickle) if overlay is not None else None
    conv = resolve_conventions(bkm, okm, conventions)
    if config is not None:  # explicit shapes (files with no header and non-LTX head counts)
        cfg = config.replace(rope=RopeConfig(conv.rope_kind, conv.rope_precision, config.rope.theta,
                                             config.rope.max_pos, config.rope.audio_max_pos),
                             av_ca_timestep_scale_multiplier=conv.av_ca_timestep_scale_multiplier)
    else:
        cfg = infer_config(bkm, conv, str(base))
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
                        len(bkm.ignored) + (len(okm.ignored) if okm else 0), cdt)
    return model, report


