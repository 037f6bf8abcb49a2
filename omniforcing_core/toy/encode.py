"""The embedded toy's encoders: the user's audio or video -> the student's latents (A->V, V->A).

The shipped codecs carry their trained encoders (`toy_codecs.safetensors`); these functions check the
input's length and call them.
"""
from __future__ import annotations

import torch

from .codecs import Codecs
from .world import HOP, SAMPLE_RATE


@torch.no_grad()
def encode_video(codecs: Codecs, frames: torch.Tensor) -> torch.Tensor:
    """[B, 3, 1 + 8k, H, W] in [0, 1] (H, W multiples of 32) -> normalised latents [B, 128, 1 + k, H/32, W/32]."""
    return codecs.video.encode(frames.float())


@torch.no_grad()
def encode_audio(codecs: Codecs, wave: torch.Tensor) -> torch.Tensor:
    """Mono [B, 160 * 4k] at 16 kHz -> normalised latents [B, 8, 1 + k, 16] (the codec's log-mel front end
    gives 1 + 4k frames)."""
    if wave.shape[-1] % (HOP * 4):
        raise ValueError(f"{wave.shape[-1]} samples; the toy audio codec needs a multiple of {HOP * 4} at "
                         f"{SAMPLE_RATE} Hz")
    return codecs.audio.encode(wave.float())


__all__ = ["encode_video", "encode_audio"]
