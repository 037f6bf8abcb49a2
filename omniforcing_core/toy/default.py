"""The shipped default: the toy student trained by this recipe (issue #6), its caption encoder and codecs
from `omniforcing_core/assets/`, or the deterministic random tiny model (with preview decoders) when
the assets are absent. The student is an ordinary checkpoint: it loads through `loader.load_model`.

The toy codecs' reach is known from their architecture (`codecs.py`) and stated here as data:
* video: each latent is decoded with its spatial neighbours but alone in time, to its own 8 frames: (0, 0);
* audio: the latent -> log-mel decoder is per latent, and the sinusoidal vocoder renders each mel frame
  as a grain two hops long whose sines are phase-locked to latent boundaries, so a window decoded from
  one latent earlier and to one latent later equals the whole decode: (1, 1), no crossfade.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..decode import Decoder, TemporalContext, audio_decoder, video_decoder
from ..embedded import random_model, toy_text
from ..layout import DEFAULT_TIME, BlockLayout, TimeBase, make_layout
from ..modality import AV
from ..text import TextKV

ASSETS = Path(__file__).resolve().parents[1] / "assets"

VIDEO_REACH = TemporalContext(0, 0)
AUDIO_REACH = TemporalContext(1, 1)
AUDIO_CROSSFADE_MEL_FRAMES = 0


def decode_toy_audio(codecs, latents: torch.Tensor, sample_rate: int = 24000) -> torch.Tensor:
    """Toy codecs: audio latents [B, 8, T, 16] -> stereo [B, 2, (4T - 3) * sample_rate / 100], the
    length LTX-2's audio VAE + vocoder give (so every streaming/muxing rule applies unchanged)."""
    w = codecs.decode_audio(latents, sample_rate)
    time = TimeBase(audio_sample_rate=sample_rate)
    n = time.audio.frames_for_latents(latents.shape[2]) * time.samples_per_mel_frame
    w = torch.nn.functional.pad(w, (0, max(0, n - w.shape[-1])))[..., :n]
    return w[:, None].expand(-1, 2, -1).contiguous()


def toy_decoders(codecs, time: TimeBase = DEFAULT_TIME) -> AV[Decoder]:
    """The toy codecs as streaming `Decoder`s (video in ComfyUI's [B, N, H, W, 3] layout)."""
    sr = time.audio_sample_rate
    return AV(video_decoder(lambda z: codecs.decode_video(z).permute(0, 2, 3, 4, 1), VIDEO_REACH, time),
              audio_decoder(lambda z: decode_toy_audio(codecs, z, sr), AUDIO_REACH, time,
                            crossfade_mel_frames=AUDIO_CROSSFADE_MEL_FRAMES))


@dataclass
class DefaultModel:
    """What `load_default()` returns.

    * `model`: OmniForcingTransformer (eval, no grad)
    * `text_encoder`: the trained caption encoder (None for the random fallback: `toy_text` then)
    * `codecs`: toy `Codecs` (video/audio decoders + procedural vocoder), None for the fallback
      (preview decoders then)
    * `layout`, `size` (pixels, square), `trained` (False = deterministic random weights)
    """

    model: torch.nn.Module
    text_encoder: Optional[torch.nn.Module]
    codecs: Optional[torch.nn.Module]
    layout: BlockLayout
    size: int
    trained: bool

    @property
    def description(self) -> str:
        return "trained toy student" if self.trained else "random tiny model"

    def text(self, prompt: str, batch: int = 1) -> TextKV:
        if self.text_encoder is None:
            return toy_text(self.model, prompt, batch)
        with torch.no_grad():
            f = self.text_encoder([prompt] * batch)
        return self.model.text_kv(f, f)

    def decoders(self, time: TimeBase = DEFAULT_TIME) -> AV[Decoder]:
        """Streaming decoders: the toy codecs, or the preview decoders for the random fallback."""
        if self.codecs is None:
            from ..preview import preview_decoders
            return preview_decoders(time)
        return toy_decoders(self.codecs, time)

    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """The whole clip at once: [B, 128, F, h, w] -> [B, 3, 1 + 8(F-1), 32h, 32w] in [0, 1]."""
        if self.codecs is None:
            from ..preview import PreviewVideoDecoder
            return PreviewVideoDecoder()(latents)
        return self.codecs.decode_video(latents)

    def decode_audio(self, latents: torch.Tensor, sample_rate: int = 24000) -> torch.Tensor:
        """The whole clip at once: [B, 8, T, 16] -> stereo waveform [B, 2, (4T - 3) * sample_rate / 100]."""
        if self.codecs is None:
            from ..preview import PreviewAudioDecoder
            return PreviewAudioDecoder(TimeBase(audio_sample_rate=sample_rate))(latents)
        return decode_toy_audio(self.codecs, latents, sample_rate)


def asset_files(assets=None) -> dict:
    """The asset files by role: student (transformer), text (caption encoder), codecs."""
    root = ASSETS if assets is None else Path(assets)
    return {n: root / f"toy_{n}.safetensors" for n in ("student", "text", "codecs")}


def has_trained_assets(assets=None) -> bool:
    return all(f.exists() for f in asset_files(assets).values())


def student_meta(assets=None) -> dict:
    """The toy metadata in the student's header: model config, layout, sinks, training size."""
    from safetensors import safe_open
    with safe_open(str(asset_files(assets)["student"]), "pt") as f:
        return json.loads(f.metadata()["omniforcing_toy"])


def load_text_and_codecs(assets=None, caption_channels: int | None = None):
    """The trained caption encoder and codecs (eval, no grad) from the assets."""
    from safetensors.torch import load_file

    from .textenc import TextEncoder
    files = asset_files(assets)
    if caption_channels is None:
        caption_channels = student_meta(assets)["model_config"]["caption_channels"]
    te = TextEncoder(caption_channels)
    te.load_state_dict(load_file(str(files["text"])), strict=True)
    from .codecs import load_codecs
    return te.eval().requires_grad_(False), load_codecs(files["codecs"])


def random_default(dtype=torch.float32, device="cpu") -> DefaultModel:
    """The fallback: the deterministic random tiny model, pseudo text features, preview decoders."""
    return DefaultModel(random_model("tiny", dtype=dtype, device=device), None, None, make_layout("v2"), 128, False)


def load_default(assets=None, dtype=torch.float32, device="cpu") -> DefaultModel:
    """The trained toy student + caption encoder + codec decoders from `assets` (default: the shipped
    ones), or the deterministic random tiny model when they are absent."""
    if not has_trained_assets(assets):
        return random_default(dtype, device)
    from ..loader import load_model

    meta = student_meta(assets)
    model, report = load_model(asset_files(assets)["student"], device=device, layout=meta["layout"])
    model = model.to(dtype)
    te, codecs = load_text_and_codecs(assets, report.config.caption_channels)
    layout = make_layout(meta["layout"], num_sinks=meta.get("num_sinks", 0))
    return DefaultModel(model, te, codecs, layout, int(meta.get("size", 128)), True)


__all__ = ["ASSETS", "VIDEO_REACH", "AUDIO_REACH", "AUDIO_CROSSFADE_MEL_FRAMES", "decode_toy_audio", "toy_decoders",
           "DefaultModel", "asset_files", "has_trained_assets", "student_meta", "load_text_and_codecs",
           "random_default", "load_default"]
