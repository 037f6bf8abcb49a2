"""Model nodes: load OmniForcing weights into ComfyUI's model management, or reuse a native LTX-2 MODEL."""
from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import torch
from comfy_api.latest import io

from ..omniforcing_core.checkpoint import KeyMap, TensorRef, scan, SAFETENSORS_DTYPES
from ..omniforcing_core.layout import make_layout
from ..omniforcing_core.loader import FP8, as_dtype, infer_config, load_model, resolve_conventions
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


def _conventions(rope: str, precision: str, gate: str) -> dict:
    return {"rope_kind": None if rope == "auto" else rope,
            "rope_precision": None if precision == "auto" else precision,
            "av_ca_timestep_scale_multiplier": None if gate == "auto" else float(gate)}


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
                       tooltip="RoPE memory layout. auto: the file header, else the released student's "
                               "'interleaved'. Force it only for files with a wrong or missing header."),
        io.Combo.Input("rope_precision", options=["auto", "float32", "float64"], default="auto", advanced=True,
                       tooltip="Precision of the RoPE frequency grid. auto: header, else float32 (released student)."),
        io.Combo.Input("av_gate_multiplier", options=["auto", "1", "1000"], default="auto", advanced=True,
                       tooltip="Timestep multiplier of the audio<->video cross-attention gates. auto: header, "
                               "else 1 (released student); LTX-2.3 headers say 1000."),
    ]


def load_managed(gen_path: Path, base_path, weight_dtype: torch.dtype | str | None = None, layout: str = "auto",
                 conventions: dict | None = None, label: str = "OmniForcing"):
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
                                     device=offload, operations=eager_operations(), conventions=conventions or {})
    kind = _layout_kind(layout, report.config.num_audio_sinks)
    host = HostModule(transformer, manual_cast_dtype=cdt, device=offload)
    patcher = comfy.model_patcher.CoreModelPatcher(host, load_device=load_device, offload_device=offload)
    conv = report.conventions
    info = (f"{label} {report.config.num_layers} layers, {report.num_params / 1e9:.3f} B params, "
            f"weights {_dtype_name(report.weight_dtype)}, compute {_dtype_name(report.compute_dtype)}, layout {kind}, "
            f"rope {conv.rope_kind}/{conv.rope_precision} ({conv.source.get('rope_kind')}), "
            f"av gate x{conv.av_ca_timestep_scale_multiplier:g}, "
            f"text connectors {'yes' if report.config.connectors else 'no (use 7680-wide LTX-2.0 conditioning)'}")
    patcher.set_attachments(ATTACHMENT, ModelHandle(transformer, kind, info))
    log.info(info)
    return patcher, info


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
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="info", tooltip="What was loaded and which conventions apply.")],
        )

    @classmethod
    def execute(cls, generator, base, weight_dtype, layout, rope, rope_precision="auto",
                av_gate_multiplier="auto") -> io.NodeOutput:
        gen_path = resolve_source(generator)
        base_path = None if base == NONE else resolve_source(base)
        if base_path is not None and base_path == gen_path:
            base_path = None
        patcher, info = load_managed(gen_path, base_path, as_dtype(weight_dtype, "weight_dtype"), layout,
                                     _conventions(rope, rope_precision, av_gate_multiplier))
        return io.NodeOutput(patcher, info)


def _native_source(dm: torch.nn.Module, unet_config: dict) -> tuple[KeyMap, dict]:
    """The native model's parameters as the core's KeyMap, and its unet_config as the parsed header."""
    refs = {k: TensorRef(Path("<native MODEL>"), k, str(p.dtype), tuple(p.shape)) for k, p in dm.named_parameters()}
    header = {k: v for k, v in (unet_config or {}).items() if isinstance(v, (str, int, float, bool, list))}
    return KeyMap(refs, "", []), header


class OmniForcingFromNativeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniForcingFromNativeModel",
            display_name="OmniForcing From Native MODEL",
            category=CATEGORY,
            description="Runs ComfyUI's native LTX-2 MODEL (CheckpointLoaderSimple / UNETLoader, LoRAs applied) "
                        "block-causally with KV caches. Shares the same weights: no second copy in memory.",
            inputs=[
                io.Model.Input("model", tooltip="A native LTX-2 audio-video MODEL, e.g. from Load Diffusion Model "
                                                "with the OmniForcing generator, after any LoRA loaders."),
                *_convention_inputs(),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="info", tooltip="Detected configuration and conventions.")],
        )

    @classmethod
    def execute(cls, model, layout, rope, rope_precision="auto", av_gate_multiplier="auto") -> io.NodeOutput:
        base = getattr(model, "model", None)
        dm = getattr(base, "diffusion_model", None)
        if type(dm).__name__ != "LTXAVModel":
            raise ValueError(f"this MODEL is a {type(dm).__name__ or type(base).__name__}, not LTX-2 audio-video; "
                             f"load the LTX-2 checkpoint or the OmniForcing generator with a native loader")
        unet_config = getattr(getattr(base, "model_config", None), "unet_config", {}) or {}
        km, header = _native_source(dm, unet_config)
        conv = resolve_conventions(km, None, _conventions(rope, rope_precision, av_gate_multiplier), base_header=header)
        cfg = infer_config(km, conv, "native MODEL", header=header)
        with torch.device("meta"):
            ours = OmniForcingTransformer(cfg)
        adopt_modules(ours, dm)
        compute = base.get_dtype_inference()
        ours.eval().requires_grad_(False)
        kind = _layout_kind(layout, cfg.num_audio_sinks)
        info = (f"OmniForcing over the native LTX-2 MODEL (shared weights): {cfg.num_layers} layers, "
                f"compute {compute}, layout {kind}, rope {conv.rope_kind}/{conv.rope_precision}, "
                f"av gate x{conv.av_ca_timestep_scale_multiplier:g}")
        patched = model.clone()
        patched.set_attachments(ATTACHMENT, ModelHandle(ours, kind, info, native=dm, compute_dtype=compute))
        return io.NodeOutput(patched, info)
