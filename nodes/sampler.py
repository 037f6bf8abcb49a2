"""The offline sampler node, and the run setup it shares with the stream node.

Everything that can be checked without the model (size, length, steps, window) is checked first,
so a bad value fails before minutes of loading; the messages come from the core and name the
nearest valid value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from comfy_api.latest import io

from ..omniforcing_core.budget import stream_bytes
from ..omniforcing_core.cache import CachePolicy
from ..omniforcing_core.layout import Clip, LayoutError, make_clip, make_layout
from ..omniforcing_core.prompts import PromptError, PromptTimeline, TextContext, resolve_prompts
from ..omniforcing_core.sampling import Given, Guidance, Sampler
from ..omniforcing_core.schedule import RELEASED_STEPS, Schedule, make_schedule, parse_steps
from .common import (CATEGORY, ModelHandle, Progress, Prompts, check_audio_vae, check_video_vae, get_handle, log,
                     prepare_for_run, preview_image, raise_interrupt)
from .conditioning import context_from_conditioning, plan_from_input

STEPS_DEFAULT = ",".join(str(s) for s in RELEASED_STEPS)
MAX_SIDE = 4096  # widget maximum of width and height


# -- inputs shared by the sampler and the stream node -------------------------------------------------

def core_inputs(seconds_default: int = 5, window_default: int = 0, seconds_max: int = 3600) -> list:
    return [
        io.Model.Input("model", tooltip="An OmniForcing MODEL ('OmniForcing Load Model' or "
                                        "'OmniForcing From Native MODEL')."),
        io.MultiType.Input(io.Conditioning.Input("positive", tooltip=(
            "What to generate: a CONDITIONING from CLIP Text Encode on the LTX-2 text encoder, or an OmniForcing "
            "prompt schedule (prompts that change over time).")), types=[Prompts]),
        io.Int.Input("width", default=768, min=32, max=MAX_SIDE, step=32,
                     tooltip="Frame width in pixels; a multiple of 32."),
        io.Int.Input("height", default=512, min=32, max=MAX_SIDE, step=32,
                     tooltip="Frame height in pixels; a multiple of 32."),
        io.Int.Input("seconds", default=seconds_default, min=1, max=seconds_max,
                     tooltip="Length in whole seconds (one block per second; 24 fps video, 24 kHz audio). "
                             "The model was trained on 5 s; longer needs a rolling window."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                     tooltip="Noise seed. Every block draws its own noise from (seed, block), so the first "
                             "seconds do not change when you make the clip longer."),
        io.String.Input("steps", default=STEPS_DEFAULT,
                        tooltip="Denoising timesteps per block, comma-separated, decreasing, 1000 = pure noise, "
                                "optional final 0. The released generator uses 1000,909,725,421,0."),
        io.Int.Input("window", default=window_default, min=0, max=3600,
                     tooltip="Rolling KV cache: how many past blocks (seconds) each block attends to besides the "
                             "first. 0 keeps everything (exact, memory grows). Streams past ~10 s need a window."),
        io.Combo.Input("layout", options=["model", "v2", "prefix"], default="model",
                       tooltip="Block layout. 'model': what the MODEL was loaded with. Force only for experiments."),
    ]


def guidance_inputs() -> list:
    return [
        io.Conditioning.Input("negative", optional=True,
                              tooltip="Optional negative prompt; turns on classifier-free guidance (2x compute)."),
        io.Float.Input("video_cfg", default=3.0, min=0.0, max=20.0, step=0.1, optional=True,
                       tooltip="Guidance scale of the video stream (only with a negative prompt; 1 = none)."),
        io.Float.Input("audio_cfg", default=5.0, min=0.0, max=20.0, step=0.1, optional=True,
                       tooltip="Guidance scale of the audio stream (only with a negative prompt; 1 = none)."),
        io.Image.Input("start_image", optional=True,
                       tooltip="Optional first frame (image -> audio + video). Encoded with the video VAE, "
                               "resized to width x height."),
        io.Boolean.Input("rebase_rope", default=False, optional=True, advanced=True,
                         tooltip="With a window: give the cached blocks window-relative positions so a stream can "
                                 "run past RoPE's 20 s range. Off: absolute positions (exact within 20 s)."),
    ]


def given_inputs() -> list:
    """Optional A->V / V->A inputs (appended last, so saved graphs keep their links)."""
    return [
        io.Audio.Input("audio", optional=True,
                       tooltip="Your audio (audio -> video): held clean in every block while the video is generated "
                               "to it. Encoded with the audio VAE, resampled as needed, cut to `seconds` (shorter "
                               "than `seconds` is an error). The stream's file carries this audio itself."),
        io.Image.Input("video", optional=True,
                       tooltip="Your video frames (video -> audio), at `video_fps`: held clean in every block while "
                               "the audio is generated to them. Resampled to 24 fps, scaled to cover width x height "
                               "(centre crop), encoded with the video VAE, cut to `seconds` (shorter is an error)."),
        io.Float.Input("video_fps", default=24.0, min=1.0, max=240.0, step=0.001, optional=True,
                       tooltip="Frame rate of `video` (e.g. the fps output of a video loader)."),
    ]


def validate_core(width=None, height=None, steps=None):
    """Queue-time checks that need no model, every bad value at once with its nearest valid one.

    Only inputs with a rule ComfyUI cannot state are checked here: ComfyUI attaches this result to
    every input named in `validate_inputs` and skips their min/max checks, so seconds and window stay
    out and keep ComfyUI's own per-input range errors. Linked values arrive as None (checked at run time)."""
    problems = []
    size = {k: v for k, v in (("width", width), ("height", height)) if isinstance(v, int)}
    for name, v in size.items():
        if v > MAX_SIDE:
            problems.append(f"{name}={v} is above {MAX_SIDE}; nearest valid {name} is {MAX_SIDE}")
    time = make_layout("v2").time
    fine = {k: v for k, v in size.items() if v <= MAX_SIDE}
    try:  # a missing or too large side stands in as one stride, so each side is judged on its own
        time.latent_grid(fine.get("height", time.spatial_stride), fine.get("width", time.spatial_stride))
    except LayoutError as e:
        problems.append(str(e))
    if isinstance(steps, str):
        try:
            make_schedule(parse_steps(steps))
        except ValueError as e:
            problems.append(str(e))
    return "; ".join(problems) if problems else True


# -- run setup ---------------------------------------------------------------------------------------

@dataclass
class RunPlan:
    handle: ModelHandle
    clip: Clip
    schedule: Schedule
    policy: CachePolicy
    prompts: PromptTimeline
    negative: Optional[TextContext]
    video_cfg: float
    audio_cfg: float

    @property
    def cfg_batch(self) -> int:
        return 2 if self.negative is not None else 1


def plan_run(model, positive, width, height, seconds, seed, steps, window, layout, negative=None,
             video_cfg=3.0, audio_cfg=5.0, rebase_rope=False) -> RunPlan:
    handle = get_handle(model)
    ours = handle.transformer
    kind = handle.layout_kind if layout == "model" else layout
    try:
        lay = make_layout(kind, num_sinks=ours.num_sinks)
        ours.check_layout(lay)
        clip = make_clip(lay, int(height), int(width), seconds=int(seconds), seed=int(seed))
        schedule = make_schedule(parse_steps(steps))
        policy = CachePolicy(window=int(window) or None, rebase_rope=bool(rebase_rope))
        plan = plan_from_input(positive)
        plan.switches(lay, clip.num_blocks)
    except (LayoutError, PromptError) as e:
        raise ValueError(str(e)) from None
    neg = context_from_conditioning(negative, "negative") if negative is not None else None
    if neg is None and (video_cfg != 3.0 or audio_cfg != 5.0):
        log.info("video_cfg/audio_cfg are ignored without a negative prompt")
    return RunPlan(handle, clip, schedule, policy, plan, neg, float(video_cfg), float(audio_cfg))


def memory_estimate(rp: RunPlan) -> int:
    """Bytes to keep free besides the weights (the core's estimate: KV cache + one block's activations)."""
    ours = rp.handle.transformer
    dtype = rp.handle.compute_dtype or ours.dtype
    return stream_bytes(ours, rp.clip, rp.policy, rp.clip.batch * rp.cfg_batch, dtype)


def encode_start_image(vae, image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> one clean latent frame [1, 128, 1, h, w] with the video VAE (LTX-2's or the toy's)."""
    import comfy.utils

    check_video_vae(vae, "vae")
    img = image[:1, :, :, :3]
    if img.shape[1:3] != (height, width):
        img = comfy.utils.common_upscale(img.movedim(-1, 1), width, height, "bilinear", "center").movedim(1, -1)
    lat = vae.encode(img)
    if lat.dim() != 5 or lat.shape[2] != 1:
        raise ValueError(f"the video VAE encoded the start image to {tuple(lat.shape)}; expected one latent frame "
                         f"[1, 128, 1, {height // 32}, {width // 32}]")
    return lat.float()


@dataclass
class GivenInput:
    """A->V / V->A: the latents the sampler holds clean and the media the stream writes as it is."""

    latents: Given
    media: object  # streaming.GivenMedia


def encode_given(rp: RunPlan, vae, audio_vae, audio=None, video=None, video_fps=24.0, time=None):
    """AUDIO ({waveform [B, C, S], sample_rate}) or IMAGE frames [N, H, W, 3] at `video_fps` -> the clip's
    clean latents (the VAE's own encode: ComfyUI's audio VAE protocol, resampled to its rate) and the media on
    the stream's clock; None without either. Too short for `seconds` is an error naming both lengths."""
    from ..omniforcing_core.streaming import GivenMedia, stream_time
    from ..omniforcing_core.usermedia import conform_audio, conform_frames, fit_length, stream_seconds

    if audio is None and video is None:
        return None
    if audio is not None and video is not None:
        raise ValueError("give either 'audio' (audio -> video) or 'video' (video -> audio), not both")
    clip = rp.clip
    time = time or clip.layout.time
    if audio is not None:
        check_audio_vae(audio_vae, "audio_vae")
        wave, rate = audio["waveform"][0].float().cpu(), int(audio["sample_rate"])
        media = conform_audio(wave, rate, time, channels=2)
        stream_seconds(media.shape[-1] / time.audio_sample_rate, clip.seconds, time, "the audio input")
        vae_rate = int(getattr(audio_vae, "audio_sample_rate", 44100))  # what ComfyUI's audio encode nodes use
        enc = conform_audio(wave, rate, stream_time(vae_rate, time), channels=2)
        enc = fit_length(enc, int((clip.seconds + 0.5) * vae_rate), -1, hold_last=False)  # whole last latent
        lat = audio_vae.encode(enc[None].movedim(1, -1))  # [1, S, C] -> [1, 8, T, 16]
        return GivenInput(Given("audio", lat.float()), GivenMedia("audio", media))
    check_video_vae(vae, "vae")
    frames = conform_frames(video[..., :3].float().cpu(), float(video_fps), time, clip.width, clip.height)
    stream_seconds(frames.shape[0] / time.fps, clip.seconds, time, "the video input")
    frames = fit_length(frames, clip.num_frames, 0, hold_last=True)
    lat = vae.encode(frames)  # [F, H, W, 3] -> [1, 128, 1 + (F - 1) / 8, h, w]
    return GivenInput(Given("video", lat.float()), GivenMedia("video", frames))


def start_sampler(rp: RunPlan, model, node_id, first_frame: Optional[torch.Tensor] = None,
                  given: Optional[Given] = None):
    """Load the model, resolve the prompts for it and return (sampler, progress)."""
    import comfy.model_management as mm

    ours, runtime = prepare_for_run(model, rp.handle, memory_estimate(rp))
    try:
        prompts, negative = resolve_prompts(ours, rp.prompts, rp.negative, runtime)
    except PromptError as e:
        raise ValueError(str(e)) from None
    guidance = Guidance(negative, rp.video_cfg, rp.audio_cfg) if negative is not None else None
    progress = Progress(node_id, rp.clip.num_blocks, rp.schedule.steps)
    sampler = Sampler(ours, rp.clip, prompts, schedule=rp.schedule, policy=rp.policy, guidance=guidance,
                      first_frame=first_frame, given=given, runtime=runtime, should_stop=mm.processing_interrupted,
                      on_step=progress.step)
    return sampler, progress


def latent_previewer(device, handle: ModelHandle):
    """latents [B, 128, F, h, w] -> a preview of their last frame, or None for no previews (respects
    --preview-method): the model's own decoder when it has one (the toy's codecs; LTX-2's latent2rgb
    makes grey blur of their latents), else ComfyUI's latent preview for LTX-2."""
    try:
        from comfy.cli_args import LatentPreviewMethod, args

        if args.preview_method == LatentPreviewMethod.NoPreviews:
            return None
        if handle.preview is not None:
            return lambda z: preview_image(handle.preview(z))
        import comfy.latent_formats
        import latent_preview

        previewer = latent_preview.get_previewer(device, comfy.latent_formats.LTXAV())
        if previewer is None:
            return None
        return lambda z: previewer.decode_latent_to_preview_image("JPEG", z[:, :, -1:].float())
    except Exception as e:  # noqa: BLE001 - previews are optional
        log.debug("no latent preview: %s", e)
        return None


# -- the node ----------------------------------------------------------------------------------------

class OmniForcingSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniForcingSampler",
            display_name="OmniForcing Sampler",
            category=CATEGORY,
            description="Generates audio + video block by block (one second per block, KV-cached) and returns a "
                        "native LTX-2 A/V LATENT: decode it with LTXV Separate AV Latent, VAE Decode and "
                        "LTXV Audio VAE Decode.",
            inputs=[*core_inputs(), *guidance_inputs(),
                    io.Vae.Input("vae", optional=True,
                                 tooltip="The LTX-2 video VAE; needed only to encode a start_image or a video."),
                    *given_inputs(),
                    io.Vae.Input("audio_vae", optional=True,
                                 tooltip="The LTX-2 audio VAE; needed only to encode an audio input.")],
            outputs=[io.Latent.Output(display_name="LATENT",
                                      tooltip="Nested video [1,128,F,H/32,W/32] + audio [1,8,T,16] latents.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, width=None, height=None, steps=None):
        return validate_core(width, height, steps)

    @classmethod
    def execute(cls, model, positive, width, height, seconds, seed, steps, window, layout, negative=None,
                video_cfg=3.0, audio_cfg=5.0, start_image=None, rebase_rope=False, vae=None, audio=None, video=None,
                video_fps=24.0, audio_vae=None) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.nested_tensor

        rp = plan_run(model, positive, width, height, seconds, seed, steps, window, layout, negative,
                      video_cfg, audio_cfg, rebase_rope)
        first = encode_start_image(vae, start_image, width, height) if start_image is not None else None
        given = encode_given(rp, vae, audio_vae, audio, video, video_fps)
        sampler, progress = start_sampler(rp, model, cls.hidden.unique_id, first,
                                          given.latents if given is not None else None)
        previewer = latent_previewer(model.load_device, rp.handle)
        videos, audios = [], []
        try:
            with torch.inference_mode():
                for res in sampler:
                    videos.append(res.video)
                    audios.append(res.audio)
                    progress.block_done(res.block, previewer(res.video) if previewer is not None else None)
        except InterruptedError:
            raise_interrupt()
        dev = mm.intermediate_device()
        video = torch.cat(videos, 2).to(dev, torch.float32)
        audio = torch.cat(audios, 2).to(dev, torch.float32)
        return io.NodeOutput({"samples": comfy.nested_tensor.NestedTensor((video, audio))})
