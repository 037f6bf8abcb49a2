"""Shared glue between ComfyUI objects and the core: the model handle, types, checks, progress.

ComfyUI modules are imported inside functions: this file is imported while ComfyUI loads custom
nodes, and `comfy.model_management` must not be imported before ComfyUI has parsed its options.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from comfy_api.latest import io

from ..omniforcing_core.decode import TemporalContext
from ..omniforcing_core.model import OmniForcingTransformer, Runtime
from .sharing import adopt_modules

log = logging.getLogger("omniforcing")

CATEGORY = "OmniForcing"
ATTACHMENT = "omniforcing"  # key of our model handle in a MODEL's attachments

# A prompt schedule: contexts with start times, resolved per model by the samplers.
Prompts = io.Custom("OMNIFORCING_PROMPTS")


@dataclass
class ModelHandle:
    """What a MODEL from our loaders carries besides ComfyUI's patcher."""

    transformer: OmniForcingTransformer
    layout_kind: str  # the layout the weights were trained for ("v2" | "prefix")
    description: str
    native: Optional[torch.nn.Module] = None  # the native LTXAV diffusion model whose modules we use
    compute_dtype: Optional[torch.dtype] = None  # None: the transformer's own (a native model's inference dtype)
    # the model's own decoder for progress previews (the toy's codecs): video latents [B, 128, F, h, w]
    # -> the last frame [H, W, 3] in [0, 1]; None: ComfyUI's LTX-2 latent preview, which only suits LTX-2 latents
    preview: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    compile: bool = False  # steady blocks through torch.compile (Runtime.compile)
    cuda_graphs: bool = False  # steady blocks replayed as CUDA graphs (Runtime.cuda_graphs)


class HostModule(torch.nn.Module):
    """The module ComfyUI's model patcher manages: our transformer plus the attributes the patcher
    expects on a model (a plain `device` attribute, `get_dtype`)."""

    def __init__(self, transformer: OmniForcingTransformer, manual_cast_dtype: Optional[torch.dtype], device):
        super().__init__()
        self.diffusion_model = transformer
        self.device = torch.device(device)  # where the weights are now; the patcher updates it
        self.manual_cast_dtype = manual_cast_dtype

    def get_dtype(self):
        return self.diffusion_model.dtype


def get_handle(model) -> ModelHandle:
    """Our handle from a MODEL input, or an error that says which node to use."""
    handle = getattr(model, "attachments", {}).get(ATTACHMENT) if model is not None else None
    if isinstance(handle, ModelHandle):
        return handle
    inner = getattr(getattr(model, "model", None), "diffusion_model", None)
    if type(inner).__name__ == "LTXAVModel":
        raise ValueError("this MODEL is ComfyUI's native LTX-2 model; connect it through the "
                         "'OmniForcing From Native MODEL' node first (it shares the weights, no copy)")
    raise ValueError(f"this MODEL ({type(getattr(model, 'model', model)).__name__}) is not an OmniForcing model; "
                     f"load one with 'OmniForcing Load Model' or convert an LTX-2 MODEL with "
                     f"'OmniForcing From Native MODEL'")


def comfy_attention():
    """ComfyUI's selected attention kernel behind our `attn_fn(q, k, v, heads, mask)` signature.

    Our masks are bool (True = attend) or additive; ComfyUI's kernels disagree on bool masks, so
    they always get an additive float mask broadcastable to [B, heads, Lq, Lk]."""
    from comfy.ldm.modules.attention import optimized_attention

    def attn(q, k, v, heads, mask=None):
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            else:
                mask = mask.to(q.dtype)
            while mask.dim() < 4:
                mask = mask.unsqueeze(0)
        return optimized_attention(q, k, v, heads, mask=mask)
    return attn


def place_loose_params(module: torch.nn.Module, device) -> None:
    """Move parameters that live on non-leaf modules (AdaLN tables, sink tokens) to `device`.

    ComfyUI's low-VRAM loader only streams leaf layers and leaves such tensors where they are;
    they are small, so they always go to the compute device."""
    for m in module.modules():
        own = dict(m.named_parameters(recurse=False))
        if own and any(True for c in m.children() if any(True for _ in c.parameters())):
            for p in own.values():
                if p.device != torch.device(device):
                    p.data = p.data.to(device)


def prepare_for_run(patcher, handle: ModelHandle, memory_required: int) -> tuple[OmniForcingTransformer, Runtime]:
    """Load the MODEL onto the compute device (ComfyUI decides full / partial); return the transformer
    and how to run it (ComfyUI's attention kernel, the compute dtype)."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], memory_required=memory_required)
    ours = handle.transformer
    if handle.native is not None:
        # loading may have replaced Parameter objects (LoRA patches): link to the current ones
        adopt_modules(ours, handle.native)
    place_loose_params(ours, patcher.load_device)
    runtime = Runtime(attn_fn=comfy_attention(), compute_dtype=handle.compute_dtype, compile=handle.compile,
                      cuda_graphs=handle.cuda_graphs)
    runtime.check(patcher.load_device)  # cuda_graphs off a CUDA device: an error now, not mid-stream
    return ours, runtime


@dataclass(frozen=True)
class StatedReach:
    """A decoder's reach as its VAE object states it (attribute `omniforcing_reach`), so the stream node
    need not probe it: latents back / ahead, and for a reach shorter than the true one (a global
    vocoder) the decoded frames (video or mel frames) crossfaded at block seams."""

    reach: TemporalContext
    crossfade_frames: int = 0


def stated_reach(vae) -> Optional[StatedReach]:
    reach = getattr(vae, "omniforcing_reach", None)
    return reach if isinstance(reach, StatedReach) else None


# The checks read LTX-2's latent format, not a class: ComfyUI's LTX-2 VAEs and the toy model's codecs
# (nodes/toy.py), which share it, both pass.
def is_video_vae(vae) -> bool:
    return (getattr(vae, "latent_dim", None) == 3 and getattr(vae, "latent_channels", None) == 128
            and tuple(getattr(vae, "upscale_index_formula", ()) or ()) == (8, 32, 32))


def is_audio_vae(vae) -> bool:
    return getattr(vae, "audio_sample_rate_output", None) is not None and getattr(vae, "latent_dim", None) == 2


def check_video_vae(vae, what: str = "vae") -> None:
    if vae is None or not is_video_vae(vae):
        hint = " (that is an audio VAE; connect the video VAE here)" if is_audio_vae(vae) else ""
        raise ValueError(f"'{what}' must be the LTX-2 video VAE (the VAE output of the LTX-2 checkpoint loader) or "
                         f"the 'vae' output of 'OmniForcing Toy Model (embedded)'{hint}")


def check_audio_vae(vae, what: str = "audio_vae") -> None:
    if vae is None or not is_audio_vae(vae):
        hint = " (that is a video VAE; load the audio VAE with 'LTXV Audio VAE Loader')" if is_video_vae(vae) else ""
        raise ValueError(f"'{what}' must be the LTX-2 audio VAE from 'LTXV Audio VAE Loader' or the 'audio_vae' "
                         f"output of 'OmniForcing Toy Model (embedded)'{hint}")


class Progress:
    """A ComfyUI progress bar over blocks x steps, with an optional preview per block."""

    def __init__(self, node_id, num_blocks: int, steps: int):
        import comfy.utils

        self.steps = steps
        self.bar = comfy.utils.ProgressBar(num_blocks * steps, node_id=node_id)

    def step(self, block, step: int, steps: int) -> None:
        self.bar.update_absolute(block.index * steps + step + 1)

    def block_done(self, block, preview=None) -> None:
        self.bar.update_absolute((block.index + 1) * self.steps, preview=preview)


def raise_interrupt():
    """Turn our sampler's stop into ComfyUI's interrupt (clears the flag, reported as cancelled)."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()
    raise mm.InterruptProcessingException()


def preview_image(frame: torch.Tensor, size: Optional[int] = None):
    """IMAGE-style frame [H, W, 3] in [0, 1] -> the (format, PIL image, max size) preview tuple."""
    from PIL import Image

    from comfy.cli_args import args

    arr = (frame.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return "JPEG", Image.fromarray(arr), size or args.preview_size
