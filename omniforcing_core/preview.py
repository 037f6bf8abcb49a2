"""Deterministic preview decoders with LTX-2's time base (no weights, no downloads).

They turn latents into something you can watch and hear: a fixed channel->RGB projection
upsampled x32 in space with the causal 1 + 8(F-1) frame rule, and additive synthesis of the 16
latent frequency bins at 24 kHz. Both have a small known temporal receptive field, so they stream
exactly, and they double as the node pack's cheap progress preview. `preview_decoders` gives them as
streaming `Decoder` values (video in ComfyUI's [B, N, H, W, 3] layout).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .decode import Decoder, TemporalContext, audio_decoder, video_decoder
from .layout import DEFAULT_TIME, TimeBase
from .modality import AV


def _projection(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float64) / math.sqrt(cols)


class PreviewVideoDecoder:
    """latents [B, C, F, h, w] -> frames [B, 3, 1 + 8(F-1), 32h, 32w] in [0, 1].

    Frame 8j - 8 + i (i = 1..8) of latent j >= 1 blends latents j-1 and j, so one latent of left
    context is needed and none of right context."""

    reach = TemporalContext(1, 0)

    def __init__(self, time: TimeBase = DEFAULT_TIME, channels: int = 128, gain: float = 1.5):
        self.time, self.gain = time, gain
        self.proj = _projection(3, channels, 1234)

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """Per-latent colour [B, 3, F, h, w] (also the cheap preview of a block)."""
        x = torch.einsum("oc,bcfhw->bofhw", self.proj.to(latents), latents)
        return torch.sigmoid(self.gain * x)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        c = self.rgb(latents)
        b, _, f, h, w = c.shape
        s = self.time.video_stride
        frames = [c[:, :, :1]]
        for j in range(1, f):
            t = torch.arange(1, s + 1, dtype=c.dtype, device=c.device).view(1, 1, s, 1, 1) / s
            frames.append(c[:, :, j - 1:j] * (1 - t) + c[:, :, j:j + 1] * t)
        x = torch.cat(frames, 2)
        n = x.shape[2]
        up = self.time.spatial_stride
        x = F.interpolate(x.transpose(1, 2).reshape(b * n, 3, h, w), scale_factor=up, mode="nearest")
        return x.view(b, n, 3, h * up, w * up).transpose(1, 2)


class PreviewAudioDecoder:
    """latents [B, 8, T, 16] -> waveform [B, 2, (4T - 3) * 240] at 24 kHz.

    Each mel frame holds the amplitudes of 16 partials (multiples of the 100 Hz mel frame rate, so
    every frame starts at phase 0 and frames join without clicks); channels 0-3 drive the left ear,
    4-7 the right. Mel frames of latent j >= 1 are 4 copies (causal, no right context)."""

    reach = TemporalContext(0, 0)

    def __init__(self, time: TimeBase = DEFAULT_TIME, base_hz: float = 200.0, gain: float = 0.08):
        self.time, self.gain = time, gain
        sr, hop = time.audio_sample_rate, time.samples_per_mel_frame
        step = time.mel_rate  # partials on multiples of the frame rate
        freqs = torch.tensor([base_hz + step * k for k in range(time.audio_mel_bins)], dtype=torch.float64)
        n = torch.arange(hop, dtype=torch.float64)
        self.table = torch.sin(2 * math.pi * freqs[:, None] * n[None] / sr)  # [16, hop]

    def mel(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, 8, T, 16] -> per-mel-frame amplitudes [B, 2, 4T - 3, 16]."""
        b, c, t, k = latents.shape
        amp = torch.sigmoid(latents.to(torch.float64) * 2 - 2)
        amp = torch.stack([amp[:, : c // 2].mean(1), amp[:, c // 2:].mean(1)], 1)  # [B, 2, T, 16]
        s = self.time.audio_stride
        return torch.cat([amp[:, :, :1], amp[:, :, 1:].repeat_interleave(s, 2)], 2)

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        m = self.mel(latents)  # [B, 2, M, 16]
        wav = torch.einsum("bcmk,kn->bcmn", m, self.table.to(m.device)) * self.gain
        return wav.reshape(wav.shape[0], 2, -1).to(latents.dtype if latents.is_floating_point() else torch.float32)


def preview_decoders(time: TimeBase = DEFAULT_TIME) -> AV[Decoder]:
    """The preview decoders as streaming `Decoder`s with their exact reach."""
    pv, pa = PreviewVideoDecoder(time), PreviewAudioDecoder(time)
    return AV(video_decoder(lambda z: pv(z).permute(0, 2, 3, 4, 1), pv.reach, time),
              audio_decoder(pa, pa.reach, time))


__all__ = ["PreviewVideoDecoder", "PreviewAudioDecoder", "preview_decoders"]
