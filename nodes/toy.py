"""The embedded toy model in ComfyUI: the tiny OmniForcing student this project trained (issue #6),
its caption encoder and its codecs, so a workflow runs end to end with no model downloads.

The student is loaded by the same loader as real checkpoints (comfy.ops layers in a
CoreModelPatcher) and samples through the ordinary OmniForcing Sampler; only text encoding and
decoding are toy-specific, because the toy has its own caption encoder and codecs instead of
Gemma and the LTX-2 VAEs. The codecs have LTX-2's latent format and time base, so they are also
offered as VAE objects wherever an LTX-2 VAE goes (the Stream node, start images, VAE Decode).
A clip of the toy's synthetic world is a node too, as the given media of the A->V / V->A examples.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from comfy_api.latest import io

from ..omniforcing_core.layout import DEFAULT_TIME
from ..omniforcing_core.toy import default as toy_default
from ..omniforcing_core.toy import encode as toy_encode
from ..omniforcing_core.toy import world as toy_world
from ..omniforcing_core.toy.world import HOP, SAMPLE_RATE
from .common import CATEGORY, StatedReach, get_handle
from .loader import load_managed

ToyKit = io.Custom("OMNIFORCING_TOY")
WORLD_SIZE = 128  # the toy world clip's frame size: the size the toy was trained at


@dataclass
class ToyKitValue:
    """What the toy's text-encode and decode nodes need besides the MODEL."""

    text_encoder: torch.nn.Module
    codecs: torch.nn.Module


def _cpu(x: torch.Tensor) -> torch.Tensor:
    # the codecs stay on the CPU: they are tiny, and the vocoder draws its phase from a CPU generator
    return x.detach().to("cpu", torch.float32)


def _out(x: torch.Tensor) -> torch.Tensor:
    import comfy.model_management as mm

    return x.to(mm.intermediate_device())  # where comfy.sd.VAE leaves its results


class ToyVideoVAE:
    """The toy video codec as a VAE: the part of comfy.sd.VAE that the pack's nodes and ComfyUI's VAE
    Decode / VAE Encode use (decode -> [B, F, H, W, 3], encode of IMAGE frames), LTX-2's latent format
    and time base (so the pack's checks accept it) and its reach stated, so the stream node need not
    probe it."""

    latent_dim = 3
    latent_channels = DEFAULT_TIME.latent_channels
    output_channels = 3

    def __init__(self, codecs):
        t = DEFAULT_TIME
        self.codecs = codecs
        self.upscale_index_formula = self.downscale_index_formula = (t.video_stride, t.spatial_stride,
                                                                     t.spatial_stride)
        self.omniforcing_reach = StatedReach(toy_default.VIDEO_REACH)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """[B, 128, F, h, w] -> frames [B, 1 + 8(F-1), 32h, 32w, 3] in [0, 1]."""
        return _out(self.codecs.decode_video(_cpu(samples)).permute(0, 2, 3, 4, 1).contiguous())

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """IMAGE frames [F, H, W, C] (one clip, as ComfyUI's video VAEs read an IMAGE batch) or
        [B, F, H, W, C] -> [B, 128, 1 + (F-1)//8, H//32, W//32]. Like LTX-2's VAE it crops the size
        (centred) to multiples of 32 and the length to 1 + 8k frames."""
        t = DEFAULT_TIME
        x = _cpu(pixels[..., :3])
        x = x[None] if x.dim() == 4 else x
        s = t.spatial_stride
        h, w = x.shape[2] // s * s, x.shape[3] // s * s
        if not h or not w:
            raise ValueError(f"the toy VAE encodes images of at least {s}x{s} pixels, not {x.shape[3]}x{x.shape[2]}")
        top, left = (x.shape[2] - h) // 2, (x.shape[3] - w) // 2
        frames = 1 + (x.shape[1] - 1) // t.video_stride * t.video_stride
        x = x[:, :frames, top:top + h, left:left + w].permute(0, 4, 1, 2, 3)
        return _out(toy_encode.encode_video(self.codecs, x))

    def last_frame(self, latents: torch.Tensor) -> torch.Tensor:
        """The progress preview: video latents [B, 128, F, h, w] -> the last frame [32h, 32w, 3]. Each latent
        decodes alone (reach 0), so the last latent by itself gives exactly the clip's last frame."""
        return self.codecs.decode_video(_cpu(latents[:1, :, -1:]))[0, :, -1].permute(1, 2, 0)


class ToyAudioVAE:
    """The toy audio codec + vocoder as an audio VAE, as ToyVideoVAE: decode -> [B, samples, 2] at
    `audio_sample_rate_output`, the reach and seam crossfade the demo streams with; encode of waveforms
    at `audio_sample_rate` (the codec's 16 kHz, which ComfyUI's audio encode nodes resample to)."""

    latent_dim = 2
    latent_channels = DEFAULT_TIME.audio_channels
    audio_sample_rate = SAMPLE_RATE

    def __init__(self, codecs, sample_rate: int = DEFAULT_TIME.audio_sample_rate):
        self.codecs = codecs
        self.audio_sample_rate_output = sample_rate
        self.first_stage_model = SimpleNamespace(output_sample_rate=sample_rate)  # LTXV Audio VAE Decode reads it
        self.omniforcing_reach = StatedReach(toy_default.AUDIO_REACH, toy_default.AUDIO_CROSSFADE_MEL_FRAMES)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """[B, 8, T, 16] -> stereo [B, (4T - 3) * rate / 100, 2] (ComfyUI's audio VAE layout)."""
        wave = toy_default.decode_toy_audio(self.codecs, _cpu(samples), self.audio_sample_rate_output)
        return _out(wave.movedim(1, -1).contiguous())

    def encode(self, waveform: torch.Tensor) -> torch.Tensor:
        """[B, samples, C] at 16 kHz -> [B, 8, 1 + k, 16]: channels averaged, cut to whole latents (40 ms)."""
        mono = _cpu(waveform).mean(-1)
        per_latent = HOP * self.codecs.audio.stride
        n = mono.shape[-1] // per_latent * per_latent
        if not n:
            raise ValueError(f"the toy audio VAE encodes at least {per_latent} samples at {SAMPLE_RATE} Hz, "
                             f"got {mono.shape[-1]}")
        return _out(toy_encode.encode_audio(self.codecs, mono[:, :n]))


def _words() -> str:
    from ..omniforcing_core.toy.world import vocabulary
    return ", ".join(w for w in vocabulary() if w != ",")


def _check_kit(toy) -> None:
    if not isinstance(toy, ToyKitValue):
        raise ValueError("'toy' must come from 'OmniForcing Toy Model (embedded)'")


def _kit_input():
    return ToyKit.Input("toy", tooltip="The 'toy' output of 'OmniForcing Toy Model (embedded)'.")


def _require_assets():
    if not toy_default.has_trained_assets():
        missing = [str(p) for p in toy_default.asset_files().values() if not p.exists()]
        raise ValueError(f"the embedded toy model is missing ({', '.join(missing)}); reinstall the pack or run "
                         f"scripts/train_toy.sh to train and export it")


class OmniForcingToyModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniForcingToyModel",
            display_name="OmniForcing Toy Model (embedded)",
            category=CATEGORY,
            description="The tiny OmniForcing student shipped with the pack (trained on a synthetic world of "
                        "bouncing, beeping shapes by the pack's own recipe). No downloads; runs on a CPU in seconds. "
                        "Use it to try the nodes, or to check an installation.",
            inputs=[],
            outputs=[io.Model.Output(display_name="MODEL"),
                     ToyKit.Output(display_name="toy", tooltip="The toy's caption encoder and codecs, for "
                                                                "'OmniForcing Toy Text Encode' and 'OmniForcing Toy "
                                                                "Decode'."),
                     io.String.Output(display_name="info", tooltip="What was loaded."),
                     # appended after the first three so saved workflows keep their links
                     io.Vae.Output(display_name="vae", tooltip="The toy video codec as a VAE: for 'OmniForcing "
                                                               "Stream', a start_image, VAE Decode / VAE Encode."),
                     io.Vae.Output(display_name="audio_vae", tooltip="The toy audio codec as an audio VAE (decode "
                                                                     "only): for 'OmniForcing Stream' and LTXV Audio "
                                                                     "VAE Decode.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        _require_assets()
        meta = toy_default.student_meta()
        patcher, info = load_managed(toy_default.asset_files()["student"], None, "default",
                                     meta.get("layout", "auto"), label="OmniForcing toy student:")
        te, codecs = toy_default.load_text_and_codecs()
        size = int(meta.get("size", 128))
        vae = ToyVideoVAE(codecs)
        get_handle(patcher).preview = vae.last_frame  # progress previews show the toy's own decode
        return io.NodeOutput(patcher, ToyKitValue(te, codecs), f"{info}; trained at {size}x{size}", vae,
                             ToyAudioVAE(codecs))


class OmniForcingToyTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniForcingToyTextEncode",
            display_name="OmniForcing Toy Text Encode",
            category=CATEGORY,
            description="Encodes a caption with the toy model's own text encoder into a CONDITIONING for the "
                        "OmniForcing samplers (and prompt-schedule nodes).",
            inputs=[
                _kit_input(),
                io.String.Input("text", multiline=True, default="a red ball bounces twice, a blue square slides",
                                tooltip="A caption in the toy world's words: " + _words() + ". Other words are "
                                        "unknown to the toy encoder and ignored."),
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, toy, text) -> io.NodeOutput:
        _check_kit(toy)
        if not text.strip():
            raise ValueError("the caption is empty; describe the shapes, e.g. 'a red ball bounces twice'")
        with torch.inference_mode():
            f = toy.text_encoder([text.strip()]).float()
        # the toy has no connectors: the same features serve video and audio, as [video | audio]
        return io.NodeOutput([[torch.cat([f, f], -1), {}]])


class OmniForcingToyDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniForcingToyDecode",
            display_name="OmniForcing Toy Decode",
            category=CATEGORY,
            description="Decodes an OmniForcing audio+video LATENT made by the toy model with the toy codecs: "
                        "IMAGE frames (24 fps) and AUDIO (24 kHz) for Create Video / Save Video.",
            inputs=[
                _kit_input(),
                io.Latent.Input("latent", tooltip="The LATENT of 'OmniForcing Sampler' run on the toy MODEL."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE"), io.Audio.Output(display_name="AUDIO")],
        )

    @classmethod
    def execute(cls, toy, latent) -> io.NodeOutput:
        _check_kit(toy)
        samples = latent.get("samples") if isinstance(latent, dict) else None
        parts = getattr(samples, "tensors", None)
        if not parts or len(parts) != 2:
            raise ValueError("'latent' must be an audio+video LATENT from 'OmniForcing Sampler'")
        video, audio = parts
        if video.dim() != 5 or video.shape[1] != 128 or audio.dim() != 4 or audio.shape[1] != 8:
            raise ValueError(f"'latent' holds video {tuple(video.shape)} / audio {tuple(audio.shape)}; expected "
                             f"[B, 128, F, h, w] and [B, 8, T, 16]")
        rate = DEFAULT_TIME.audio_sample_rate
        with torch.inference_mode():
            frames = toy.codecs.decode_video(video[:1].float())[0].permute(1, 2, 3, 0).contiguous()
            stereo = toy_default.decode_toy_audio(toy.codecs, audio[:1].float(), rate).cpu()
        return io.NodeOutput(frames.cpu(), {"waveform": stereo, "sample_rate": rate})


class OmniForcingToyWorldClip(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniForcingToyWorldClip",
            display_name="OmniForcing Toy World Clip",
            category=CATEGORY,
            description="One clip of the toy model's synthetic world (bouncing and sliding shapes, a tone at every "
                        "contact): frames, sound and caption. It exists so the audio -> video and video -> audio "
                        "examples run with no files; with your own media, use Load Audio (audio -> video) or Load "
                        "Video / image frames (video -> audio) instead.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Which clip: the seed picks the shapes, colours and motions (the same seed "
                                     "always gives the same clip)."),
                io.Int.Input("seconds", default=5, min=1, max=20,
                             tooltip="Length in whole seconds (1 + 24 per second frames; the caption counts the "
                                     "contacts within it)."),
            ],
            outputs=[io.Image.Output(display_name="IMAGE", tooltip="The frames: 1 + 24 x seconds at 128x128, 24 fps."),
                     io.Audio.Output(display_name="AUDIO", tooltip="The sound: mono, 16 kHz, seconds long; one tone "
                                                                   "per contact, its pitch the object's colour."),
                     io.String.Output(display_name="caption", tooltip="What happens in the clip, in the toy world's "
                                                                     "words: a prompt for 'OmniForcing Toy Text "
                                                                     "Encode'."),
                     io.Float.Output(display_name="fps", tooltip="The frame rate of IMAGE (24), for a 'video_fps' "
                                                                 "input.")],
        )

    @classmethod
    def execute(cls, seed, seconds) -> io.NodeOutput:
        clip = toy_world.make_clip(int(seed), int(seconds), WORLD_SIZE)
        frames = clip.video.permute(1, 2, 3, 0).contiguous().float()  # [3, F, H, W] -> IMAGE [F, H, W, 3]
        audio = {"waveform": clip.audio.float()[None, None].contiguous(), "sample_rate": toy_world.SAMPLE_RATE}
        return io.NodeOutput(frames, audio, clip.caption, float(toy_world.FPS))
