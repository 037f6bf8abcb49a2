"""Model nodes: load OmniForcing weights into ComfyUI's model management, or reuse a native LTX-2 MODEL."""
from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from comfy_api.latest import io

from ..omniforcing_core.checkpoint import KeyMap, TensorRef, scan, SAFETENSORS_DTYPES
from ..omniforcing_core.config import CONVENTION_FIELDS, PRESETS
from ..omniforcing_core.layout import make_layout
from ..omniforcing_core.loader import FP8, as_dtype, describe_config, load_model, resolve_conventions
from ..omniforcing_core.model import OmniForcingTransformer
from .common import ATTACHMENT, CATEGORY, HostModule, ModelHandle, adopt_modules, log

FOLDERS = ("omniforcing", "diffusion_models", "checkpoints")
_SHARD = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")
NONE = "none"


def register_model_folder() -> None:
    """models/omniforcing, listed like any model folder (extra_model_paths.yaml may add more)."""
    import folder_paths

    if "omniforcing" not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths["omniforcing"] = (
            [os.path.join(folder_paths.models_dir, "omniforcing")], {".safetensors", ".json"})


def list_sources() -> list[str]:
    """'<folder>/<path>': single .safetensors files, folders of shards ('<folder>/<name>/', the index
    inside is found by the loader, whatever it is called) and indexes lying directly in a model folder."""
    import folder_paths

    out = set()
    for folder in FOLDERS:
        try:
            roots = folder_paths.get_folder_paths(folder)
        except KeyError:
            continue
        for root in roots:
            if not os.path.isdir(root):
                continue
            for dirpath, dirs, files in os.walk(root, followlinks=True):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
                rel = (lambda f: f if rel_dir == "." else f"{rel_dir}/{f}")  # noqa: E731
                shards = [f for f in files if f.endswith(".safetensors") and _SHARD.search(f)]
                indexes = [f for f in files if f.endswith(".safetensors.index.json")]
                out.update(f"{folder}/{rel(f)}" for f in files if f.endswith(".safetensors") and not _SHARD.search(f))
                if rel_dir == ".":
                    out.update(f"{folder}/{f}" for f in indexes)
                elif shards or indexes:
                    out.add(f"{folder}/{rel_dir}/")
    return sorted(out)


def resolve_source(name: str) -> Path:
    import folder_paths

    folder, _, rel = name.partition("/")
    if folder not in FOLDERS or not rel:
        raise ValueError(f"'{name}' is not a model entry; pick one from the list (models/omniforcing, "
                         f"diffusion_models or checkpoints)")
    for root in folder_paths.get_folder_paths(folder):
        path = os.path.join(root, rel)
        if folder_paths.is_within_directory(root, path) and os.path.exists(path):
            return Path(path)
    raise FileNotFoundError(f"'{rel}' is not in models/{folder} any more; refresh the node list (press R) "
                            f"after moving files")


def _stored_dtype(path: Path) -> torch.dtype:
    """The most common floating dtype in a checkpoint (headers only)."""
    counts: dict[torch.dtype, int] = {}
    for ref in scan(path).refs.values():
        dt = SAFETENSORS_DTYPES.get(ref.dtype)
        if dt is not None and dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + ref.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def _dtype_name(dt: torch.dtype | None) -> str:
    return "as stored" if dt is None else str(dt).removeprefix("torch.")


def eager_operations():
    """comfy.ops.manual_cast layers (ComfyUI offloads and casts them per layer, fp8 included), with
    ordinary parameter creation: our loader builds on the meta device and assigns every tensor
    itself, which ComfyUI's lazy dynamic-VRAM init (weights left None) would break."""
    import comfy.ops

    base = comfy.ops.manual_cast

    class Linear(base.Linear):
        _load_from_state_dict = torch.nn.Module._load_from_state_dict

    class RMSNorm(base.RMSNorm):
        _load_from_state_dict = torch.nn.Module._load_from_state_dict

    return SimpleNamespace(Linear=Linear, RMSNorm=RMSNorm)


PRESET_CHOICES = ["auto", *PRESETS]


def _parse_pairs(text: str, what: str) -> dict:
    """'a=1, b=x' -> {'a': '1', 'b': 'x'}; '' / 'auto' -> {}."""
    text = (text or "").strip()
    if text in ("", "auto"):
        return {}
    out = {}
    for item in text.replace(";", ",").split(","):
        k, sep, v = item.partition("=")
        if not sep or not k.strip() or not v.strip():
            raise ValueError(f"{what}: '{item.strip()}' is not name=value; write e.g. {_EXAMPLES[what]}")
        out[k.strip()] = v.strip()
    return out


_EXAMPLES = {"convention_overrides": "'gate_timestep=own, causal_fix=true'",
             "heads": "'video=32, audio=32, connector=30'"}


def _value(field: str, v: str):
    choices = CONVENTION_FIELDS[field][0]
    if choices == (True, False):
        if v.lower() not in ("true", "false"):
            raise ValueError(f"convention_overrides: {field} takes true or false, got '{v}'")
        return v.lower() == "true"
    if choices is None:
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"convention_overrides: {field} takes a number, got '{v}'") from None
    return v


def _conventions(rope: str, precision: str, gate: str, preset: str = "auto", overrides: str = "") -> dict:
    """The widgets as `resolve_conventions` overrides (None: auto)."""
    extra = _parse_pairs(overrides, "convention_overrides")
    unknown = sorted(set(extra) - set(CONVENTION_FIELDS))
    if unknown:
        raise ValueError(f"convention_overrides: unknown field(s) {unknown}; known: {', '.join(CONVENTION_FIELDS)}")
    out = {k: _value(k, v) for k, v in extra.items()}
    out.update({"rope_kind": None if rope == "auto" else rope,
                "rope_precision": None if precision == "auto" else precision,
                "av_ca_timestep_scale_multiplier": None if gate == "auto" else float(gate)})
    if preset != "auto":
        out["preset"] = preset
    return out


def _architecture(heads: str) -> dict:
    """'video=32, audio=32, connector=30' -> the loader's architecture overrides."""
    names = {"video": "video_heads", "audio": "audio_heads", "connector": "connector_heads"}
    out = {}
    for k, v in _parse_pairs(heads, "heads").items():
        if k not in names or not v.isdigit() or int(v) < 1:
            raise ValueError(f"heads: '{k}={v}' is not one of video=N, audio=N, connector=N (N >= 1)")
        out[names[k]] = int(v)
    return out


def _layout_kind(choice: str, sinks: int) -> str:
    kind = ("prefix" if sinks else "v2") if choice == "auto" else choice
    make_layout(kind, num_sinks=sinks)  # LayoutError names the fix
    return kind


def _convention_inputs():
    return [
        io.Combo.Input("layout", options=["auto", "v2", "prefix"], default="auto",
                       tooltip="Block layout the weights were trained for. auto: 'prefix' when the file has audio "
                               "sink tokens, else 'v2' (the released 4-3-3-3-3 checkpoint)."),
        io.Combo.Input("rope", options=["auto", "interleaved", "split"], default="auto",
                       tooltip="RoPE memory layout. auto: the file header, else the conventions preset's "
                               "(the released student: 'interleaved'). Force it only for files with a wrong or "
                               "missing header."),
        io.Combo.Input("rope_precision", options=["auto", "float32", "float64"], default="auto", advanced=True,
                       tooltip="Precision of the RoPE frequency grid. auto: header, else the preset's (student: "
                               "float32). float64 is numpy float64 rounded to float32, as ltx-core and ComfyUI do."),
        io.Combo.Input("av_gate_multiplier", options=["auto", "1", "1000"], default="auto", advanced=True,
                       tooltip="Timestep multiplier of the audio<->video cross-attention gates. auto: header, "
                               "else the preset's (student: 1; the LTX-2 header says 1000)."),
    ]


def _preset_inputs(default_hint: str):
    return [
        # optional, so graphs saved before these widgets existed still validate
        io.Combo.Input("conventions", options=PRESET_CHOICES, default="auto", advanced=True, optional=True,
                       tooltip="Conventions preset the weights run under: omniforcing-student (the released "
                               "causal checkpoint, as ltx-causal runs it), ltx-core (Lightricks' reference with "
                               "the LTX-2 header), comfyui (ComfyUI's LTXAVModel). auto: " + default_hint +
                               " The widgets above and convention_overrides change single fields; the info "
                               "output says where each value came from."),
        io.String.Input("convention_overrides", default="", advanced=True, optional=True,
                        tooltip="Single convention fields, comma separated: " + ", ".join(
                            f"{k} ({'/'.join(map(str, c)) if c else 'number'})" for k, (c, _) in
                            CONVENTION_FIELDS.items()) + ". Example: gate_timestep=own, causal_fix=true"),
    ]


def _speed_inputs() -> list:
    """Optional (graphs saved before them still validate), at the end, off by default."""
    return [
        io.Boolean.Input("compile", default=False, advanced=True, optional=True,
                         tooltip="Run steady blocks (a full rolling window) through torch.compile with static "
                                 "shapes: one compile (minutes for LTX-2 19B) at the first steady block, then "
                                 "every steady block replays it. Off: plain PyTorch."),
        io.Boolean.Input("cuda_graphs", default=False, advanced=True, optional=True,
                         tooltip="Replay steady blocks as CUDA graphs (one capture per denoising step, then one "
                                 "launch per forward instead of thousands of kernel launches). CUDA only; needs "
                                 "a rolling window; not with parallel modalities."),
    ]


def _sources_line(sources: dict) -> str:
    heads = {k.split("_")[0]: v for k, v in sources.items() if k.endswith("_heads")}
    return "heads from " + ", ".join(f"{k}: {v}" for k, v in heads.items()) if heads else ""


def load_managed(gen_path: Path, base_path, weight_dtype: torch.dtype | str | None = None, layout: str = "auto",
                 conventions: dict | None = None, label: str = "OmniForcing", architecture: dict | None = None,
                 compile: bool = False, cuda_graphs: bool = False):
    """Load a generator (over an optional base) with comfy.ops layers into a CoreModelPatcher that
    carries our handle: (patcher, info line). weight_dtype: None (as stored) or a dtype (or its name)."""
    import comfy.model_management as mm
    import comfy.model_patcher

    load_device, offload = mm.get_torch_device(), mm.unet_offload_device()
    weight_dtype = as_dtype(weight_dtype, "weight_dtype")
    wdt = weight_dtype or _stored_dtype(gen_path)
    # compute dtype the way ComfyUI picks it for LTX-2 (bf16 or fp32 depending on the device)
    cast = mm.unet_manual_cast(wdt, load_device, [torch.bfloat16, torch.float32])
    cdt = cast or (torch.bfloat16 if wdt in FP8 else wdt)
    src, overlay = (base_path, gen_path) if base_path is not None else (gen_path, None)
    transformer, report = load_model(src, overlay, weight_dtype=weight_dtype, compute_dtype=cdt,
                                     device=offload, operations=eager_operations(), conventions=conventions or {},
                                     architecture=architecture or {})
    kind = _layout_kind(layout, report.config.num_audio_sinks)
    host = HostModule(transformer, manual_cast_dtype=cdt, device=offload)
    patcher = comfy.model_patcher.CoreModelPatcher(host, load_device=load_device, offload_device=offload)
    conv = report.conventions
    info = (f"{label} {report.config.num_layers} layers, {report.num_params / 1e9:.3f} B params, "
            f"weights {_dtype_name(report.weight_dtype)}, compute {_dtype_name(report.compute_dtype)}, layout {kind}, "
            f"text connectors {'yes' if report.config.connectors else 'no (use 7680-wide LTX-2.0 conditioning)'}; "
            f"{_sources_line(report.config_source)}\n{_conventions_info(conv)}")
    patcher.set_attachments(ATTACHMENT, ModelHandle(transformer, kind, info, compile=bool(compile),
                                                    cuda_graphs=bool(cuda_graphs)))
    log.info(info)
    return patcher, info


def _conventions_info(conv) -> str:
    """The conventions, one field a line with where it came from."""
    name = conv.values.preset or f"custom, based on {conv.based_on}"
    return f"conventions: {name}\n" + "\n".join(f"  {k} = {v}  ({conv.source.get(k, '?')})"
                                                  for k, v in conv.values.as_dict().items())


class OmniForcingModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_model_folder()
        sources = list_sources()
        return io.Schema(
            node_id="OmniForcingModelLoader",
            display_name="OmniForcing Load Model",
            category=CATEGORY,
            description="Loads the block-causal OmniForcing transformer (LTX-2 A/V) into ComfyUI's model "
                        "management (offloading, fp8). Text connectors come from the base checkpoint.",
            inputs=[
                io.Combo.Input("generator", options=sources,
                               tooltip="The OmniForcing generator: a .safetensors file or a folder of shards (with "
                                       "its *.safetensors.index.json), from models/omniforcing, "
                                       "models/diffusion_models or models/checkpoints."),
                io.Combo.Input("base", options=[NONE] + sources, default=NONE,
                               tooltip="The LTX-2 base checkpoint the generator was distilled from (e.g. "
                                       "ltx-2-19b-dev.safetensors). It supplies the text connectors and any weight "
                                       "the generator lacks. 'none' when the generator file is complete."),
                io.Combo.Input("weight_dtype", options=["default", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2"],
                               default="default",
                               tooltip="How weights are stored in memory. default: as in the file. fp8 halves memory "
                                       "(linear layers only; they are upcast per layer at compute)."),
                *_convention_inputs(),
                *_preset_inputs("the generator file's header, else omniforcing-student; a base loaded alone with "
                                "an LTX-2 header: ltx-core."),
                io.String.Input("heads", default="auto", advanced=True, optional=True,
                                tooltip="Attention head counts for files whose header does not state them and "
                                        "whose shapes are not a known architecture (LTX-2 19B is recognised): "
                                        "e.g. 'video=32, audio=32, connector=30'. auto: header or known "
                                        "architecture, else an error saying what is missing."),
                *_speed_inputs(),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="info", tooltip="What was loaded and which conventions apply, "
                                                                   "each with where it came from.")],
        )

    @classmethod
    def execute(cls, generator, base, weight_dtype, layout, rope, rope_precision="auto",
                av_gate_multiplier="auto", conventions="auto", convention_overrides="",
                heads="auto", compile=False, cuda_graphs=False) -> io.NodeOutput:
        gen_path = resolve_source(generator)
        base_path = None if base == NONE else resolve_source(base)
        if base_path is not None and base_path == gen_path:
            base_path = None
        patcher, info = load_managed(gen_path, base_path, as_dtype(weight_dtype, "weight_dtype"), layout,
                                     _conventions(rope, rope_precision, av_gate_multiplier, conventions,
                                                  convention_overrides), architecture=_architecture(heads),
                                     compile=compile, cuda_graphs=cuda_graphs)
        return io.NodeOutput(patcher, info)


_NATIVE_CONVENTION_KEYS = ("rope_type", "frequencies_precision", "causal_temporal_positioning",
                           "use_middle_indices_grid", "av_ca_timestep_scale_multiplier")


def _native_source(dm: torch.nn.Module, unet_config: dict | None = None) -> tuple[KeyMap, dict]:
    """The native model's parameters as the core's KeyMap, and what the live LTXAVModel says of itself as an
    LTX-style header: its geometry always; a convention key only when the model's file stated it (it is in
    `unet_config`), since otherwise the module holds ComfyUI's constructor default, which the `comfyui`
    preset already is (and another preset, chosen on the node, must not be overridden by it). Without a
    `unet_config` every convention key is taken from the module."""
    refs = {k: TensorRef(Path("<native MODEL>"), k, str(p.dtype), tuple(p.shape)) for k, p in dm.named_parameters()}
    header = {"num_attention_heads": dm.num_attention_heads, "attention_head_dim": dm.attention_head_dim,
              "audio_num_attention_heads": dm.audio_num_attention_heads,
              "audio_attention_head_dim": dm.audio_attention_head_dim,
              "timestep_scale_multiplier": float(dm.timestep_scale_multiplier),
              "positional_embedding_theta": float(dm.positional_embedding_theta),
              "positional_embedding_max_pos": [float(x) for x in dm.positional_embedding_max_pos],
              "audio_positional_embedding_max_pos": [float(x) for x in dm.audio_positional_embedding_max_pos]}
    module_says = {"rope_type": str(getattr(dm.split_positional_embedding, "value", dm.split_positional_embedding)),
                   "frequencies_precision": "float64" if dm.freq_grid_generator.__name__ == "generate_freq_grid_np"
                   else "float32",
                   "causal_temporal_positioning": bool(dm.causal_temporal_positioning),
                   "use_middle_indices_grid": bool(dm.use_middle_indices_grid),
                   "av_ca_timestep_scale_multiplier": float(dm.av_ca_timestep_scale_multiplier)}
    header.update({k: v for k, v in module_says.items() if unet_config is None or k in unet_config})
    conn = getattr(dm, "video_embeddings_connector", None)
    if conn is not None:
        header["connector_num_attention_heads"] = conn.num_attention_heads
        header["connector_attention_head_dim"] = conn.inner_dim // conn.num_attention_heads
        # the connectors' own RoPE layout (ComfyUI: split unless the header's rope_type says otherwise)
        header["connector_rope_type"] = "split" if conn.split_rope else "interleaved"
        header["connector_positional_embedding_max_pos"] = [float(x) for x in conn.positional_embedding_max_pos]
    return KeyMap(refs, "", []), header


def _native_qk_eps(dm: torch.nn.Module) -> float:
    return float(dm.transformer_blocks[0].attn1.q_norm.eps)


def native_config(dm: torch.nn.Module, overrides: dict, unet_config: dict | None = None):
    """(config, conventions, config sources) for running a native LTXAVModel through our block loop: the
    `comfyui` preset (or the one picked on the node), with what the model's file stated (RoPE layout and
    precision, positions, gate multiplier) and the module's q/k-norm eps, then the widgets' overrides."""
    km, header = _native_source(dm, unet_config)
    conv = resolve_conventions(km, None, overrides, base_header=header,
                               default=("comfyui", "ComfyUI LTXAVModel 783545f6"), header_source="native model")
    eps = _native_qk_eps(dm)  # the q/k norms are the native modules themselves (shared): their eps rules
    if conv.values.qk_norm_eps != eps:
        if "qk_norm_eps" in (overrides or {}):
            raise ValueError(f"qk_norm_eps={conv.values.qk_norm_eps:g}: the native model's q/k norms are shared, "
                             f"not copied, and use eps {eps:g}; drop the override")
        conv = type(conv)(conv.values.replace(qk_norm_eps=eps), {**conv.source, "qk_norm_eps": "native model"},
                          conv.based_on)
    cfg, sources = describe_config(km, conv, "native MODEL", header=header, header_source="native model")
    return cfg, conv, sources


class OmniForcingFromNativeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniForcingFromNativeModel",
            display_name="OmniForcing From Native MODEL",
            category=CATEGORY,
            description="Runs ComfyUI's native LTX-2 MODEL (CheckpointLoaderSimple / UNETLoader, LoRAs applied) "
                        "block-causally with KV caches. Shares the same weights: no second copy in memory. By "
                        "default it runs them the way ComfyUI's own LTXAVModel does (the comfyui conventions "
                        "preset, with the model's own RoPE and position settings).",
            inputs=[
                io.Model.Input("model", tooltip="A native LTX-2 audio-video MODEL, e.g. from Load Diffusion Model "
                                                "with the OmniForcing generator, after any LoRA loaders."),
                *_convention_inputs(),
                *_preset_inputs("comfyui, with the native model's RoPE layout, precision, positions and gate "
                                "multiplier (what ComfyUI's own forward does). For the released OmniForcing "
                                "student loaded natively, pick omniforcing-student."),
                *_speed_inputs(),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="info", tooltip="Detected configuration and conventions, each "
                                                                   "with where it came from.")],
        )

    @classmethod
    def execute(cls, model, layout, rope, rope_precision="auto", av_gate_multiplier="auto", conventions="auto",
                convention_overrides="", compile=False, cuda_graphs=False) -> io.NodeOutput:
        base = getattr(model, "model", None)
        dm = getattr(base, "diffusion_model", None)
        if type(dm).__name__ != "LTXAVModel":
            raise ValueError(f"this MODEL is a {type(dm).__name__ or type(base).__name__}, not LTX-2 audio-video; "
                             f"load the LTX-2 checkpoint or the OmniForcing generator with a native loader")
        unet_config = getattr(getattr(base, "model_config", None), "unet_config", None)
        cfg, conv, sources = native_config(dm, _conventions(rope, rope_precision, av_gate_multiplier, conventions,
                                                            convention_overrides), unet_config)
        with torch.device("meta"):
            ours = OmniForcingTransformer(cfg)
        adopt_modules(ours, dm)
        compute = base.get_dtype_inference()
        ours.eval().requires_grad_(False)
        kind = _layout_kind(layout, cfg.num_audio_sinks)
        info = (f"OmniForcing over the native LTX-2 MODEL (shared weights): {cfg.num_layers} layers, "
                f"compute {compute}, layout {kind}; {_sources_line(sources)}\n{_conventions_info(conv)}")
        patched = model.clone()
        patched.set_attachments(ATTACHMENT, ModelHandle(ours, kind, info, native=dm, compute_dtype=compute,
                                                        compile=bool(compile), cuda_graphs=bool(cuda_graphs)))
        return io.NodeOutput(patched, info)
