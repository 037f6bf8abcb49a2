"""The embedded toy model in ComfyUI: the tiny OmniForcing student this project trained (issue #6),
its caption encoder and its codecs, so a workflow runs end to end with no model downloads.

The student is loaded by the same loader as real checkpoints (comfy.ops layers in a
CoreModelPatcher) and samples through the ordinary OmniForcing Sampler; only text encoding and
decoding are toy-specific, because the toy has its own caption encoder and codecs instead of
Gemma and the LTX-2 VAEs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from ..omniforcing_core.layout import DEFAULT_TIME
from ..omniforcing_core.toy import default as toy_default
from .common import CATEGORY
from .loader import load_managed

ToyKit = io.Custom("OMNIFORCING_TOY")


@dataclass
class ToyKitValue:
    """What the toy's text-encode and decode nodes need besides the MODEL."""

    text_encoder: torch.nn.Module
    codecs: torch.nn.Module


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
                     io.String.Output(display_name="info", tooltip="What was loaded.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        _require_assets()
        meta = toy_default.student_meta()
        patcher, info = load_managed(toy_default.asset_files()["student"], None, "default",
                                     meta.get("layout", "auto"), label="OmniForcing toy student:")
        te, codecs = toy_default.load_text_and_codecs()
        size = int(meta.get("size", 128))
        return io.NodeOutput(patcher, ToyKitValue(te, codecs), f"{info}; trained at {size}x{size}")


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
