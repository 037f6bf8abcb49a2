"""Tiny video and audio autoencoders with LTX-2's exact time base, and a procedural vocoder.

Video: [B, 3, F, H, W] (F = 1 + 8k, 24 fps) -> [B, 128, 1 + k, H/32, W/32]. Like LTX-2's causal VAE
the first latent holds pixel frame 0 alone (the encoder sees it replicated 8 times) and every later
latent holds 8 frames. Internally the frames are average-pooled 4x (the toy works at 1/4 resolution)
and each latent is an MLP code of one 8-frame x 8x8 (pooled) patch, so the decoder's receptive
field is exactly one latent: decoding streams block by block with no overlap.

Audio: 16 kHz waveform -> log-mel (n_fft 1024, hop 160, 64 mel bins, 100 frames/s, centred) with
M = 1 + 4k frames -> [B, 8, 1 + k, 16] (8 channels x 16 latent bins = 128 per latent frame, 25/s).
Latent 0 holds mel frame 0 alone. The decoder maps latents back to log-mel; `Vocoder` turns
log-mel into a waveform with Griffin-Lim (no weights).

Latents are normalised per channel (LTX-2's per-channel statistics) so diffusion sees ~unit scale.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .world import HOP, SAMPLE_RATE

N_FFT = 1024
N_MELS = 64
MEL_OFFSET, MEL_SCALE = 5.0, 3.0  # log-mel normalisation for the audio codec (log(1e-5) = -11.5)


class VideoCodec(nn.Module):
    """One latent per 8 frames x (32 x 32) pixels, LTX-2's grid; the toy works at half resolution inside
    (`pool` 2: a latent covers 8 frames of 16 x 16 pooled pixels).

    Encoder: every frame of a tile through a shared MLP to a small frame code, the tile's 8 frame codes
    to the latent (so the frame where an event happens keeps its own slot). Decoder: a latent and its 8
    spatial neighbours (zeros beyond the border) -> 8 frame codes -> each frame's pixels, so an object
    across a tile edge is drawn by both tiles alike (no seams). Time reach is exactly one latent."""

    def __init__(self, channels: int = 128, hidden: int = 256, frame_code: int = 32, pool: int = 2,
                 spatial: int = 32, stride: int = 8):
        super().__init__()
        self.channels, self.pool, self.spatial, self.stride, self.frame_code = channels, pool, spatial, stride, frame_code
        self.patch = spatial // pool
        d = 3 * self.patch * self.patch
        self.enc = nn.ModuleDict({"frame": nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, frame_code)),
                                  "time": nn.Linear(stride * frame_code, channels)})
        self.dec = nn.ModuleDict({"time": nn.Sequential(nn.Linear(9 * channels, hidden), nn.GELU(),
                                                        nn.Linear(hidden, stride * frame_code)),
                                  "frame": nn.Sequential(nn.Linear(frame_code, hidden), nn.GELU(), nn.Linear(hidden, d))})
        self.register_buffer("latent_mean", torch.zeros(channels))
        self.register_buffer("latent_std", torch.ones(channels))

    def _groups(self, video: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        """[B, 3, F, H, W] -> [B, n, hh, ww, 8, 3 * p * p]: each latent's 8 frames of its tile."""
        b, c, f, h, w = video.shape
        if (f - 1) % self.stride:
            raise ValueError(f"video has {f} frames; the codec needs 1 + {self.stride}k")
        x = F.avg_pool3d(video, (1, self.pool, self.pool)) if self.pool > 1 and not pooled else video
        x = torch.cat([x[:, :, :1].expand(-1, -1, self.stride - 1, -1, -1), x], 2)  # causal: frame 0 alone
        p, s = self.patch, self.stride
        n, hh, ww = x.shape[2] // s, x.shape[3] // p, x.shape[4] // p
        x = x.reshape(b, c, n, s, hh, p, ww, p).permute(0, 2, 4, 6, 3, 1, 5, 7)
        return x.reshape(b, n, hh, ww, s, c * p * p)

    def encode(self, video: torch.Tensor, normalise: bool = True, pooled: bool = False) -> torch.Tensor:
        """[B, 3, F, H, W] in [0, 1] -> [B, 128, 1 + (F-1)/8, H/32, W/32] (`pooled`: input already at 1/pool size)."""
        g = self._groups(video.float() * 2 - 1, pooled)
        z = self.enc["time"](self.enc["frame"](g).flatten(-2)).permute(0, 4, 1, 2, 3)
        if normalise:
            z = (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)
        return z

    def decode(self, latents: torch.Tensor, normalised: bool = True, full_res: bool = True) -> torch.Tensor:
        """[B, 128, L, h, w] -> [B, 3, 1 + 8(L-1), 32h, 32w] in [0, 1] (1/pool size if not full_res)."""
        z = latents.float()
        if normalised:
            z = z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)
        b, c, n, hh, ww = z.shape
        zp = F.pad(z, (1, 1, 1, 1))
        near = torch.cat([zp[..., i:i + hh, j:j + ww] for i in range(3) for j in range(3)], 1)  # [B, 9C, n, h, w]
        p, s = self.patch, self.stride
        codes = self.dec["time"](near.permute(0, 2, 3, 4, 1)).view(b, n, hh, ww, s, self.frame_code)
        x = self.dec["frame"](codes).view(b, n, hh, ww, s, 3, p, p)
        x = x.permute(0, 5, 1, 4, 2, 6, 3, 7).reshape(b, 3, n * s, hh * p, ww * p)[:, :, s - 1:]
        x = (x + 1) / 2
        if full_res and self.pool > 1:
            f = x.shape[2]
            x = F.interpolate(x.transpose(1, 2).reshape(b * f, 3, hh * p, ww * p), scale_factor=self.pool,
                              mode="bilinear", align_corners=False)
            x = x.view(b, f, 3, hh * p * self.pool, ww * p * self.pool).transpose(1, 2)
        return x.clamp(0, 1)


def mel_filterbank(n_fft: int = N_FFT, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE,
                   f_min: float = 0.0, f_max: Optional[float] = None) -> torch.Tensor:
    """Triangular HTK-mel filters [n_mels, n_fft // 2 + 1], area-normalised (Slaney-style)."""
    f_max = f_max or sample_rate / 2
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    pts = torch.linspace(mel(f_min), mel(f_max), n_mels + 2, dtype=torch.float64)
    hz = 700 * (10 ** (pts / 2595) - 1)
    freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    lo, ce, hi = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    fb = torch.clamp(torch.minimum((freqs - lo) / (ce - lo), (hi - freqs) / (hi - ce)), min=0)
    fb = fb * (2.0 / (hi - lo))
    return fb.float()


def mel_bin_of(freq: float, n_mels: int = N_MELS, sample_rate: int = SAMPLE_RATE) -> int:
    mel = lambda f: 2595 * math.log10(1 + f / 700)  # noqa: E731
    return int(round(mel(freq) / mel(sample_rate / 2) * (n_mels + 1))) - 1


class MelFrontEnd(nn.Module):
    """LTX-2's audio front end at toy scale: STFT 1024 / hop 160 (centred, reflect), 64 mel, log."""

    def __init__(self):
        super().__init__()
        self.register_buffer("fb", mel_filterbank(), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        """[B, N] (N = 160 m) -> log-mel [B, 64, m + 1]."""
        spec = torch.stft(wave.float(), N_FFT, HOP, window=self.window, center=True, pad_mode="reflect",
                          return_complex=True).abs()
        return torch.log(torch.clamp(self.fb @ spec, min=1e-5))


class AudioCodec(nn.Module):
    def __init__(self, channels: int = 8, bins: int = 16, hidden: int = 256, stride: int = 4, n_mels: int = N_MELS):
        super().__init__()
        self.channels, self.bins, self.stride, self.n_mels = channels, bins, stride, n_mels
        d = n_mels * stride
        self.enc = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, channels * bins))
        self.dec = nn.Sequential(nn.Linear(channels * bins, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.register_buffer("latent_mean", torch.zeros(channels * bins))
        self.register_buffer("latent_std", torch.ones(channels * bins))
        self.front = MelFrontEnd()

    def encode_mel(self, mel: torch.Tensor, normalise: bool = True) -> torch.Tensor:
        """log-mel [B, 64, 1 + 4k] -> [B, 8, 1 + k, 16]."""
        b, m, t = mel.shape
        if (t - 1) % self.stride:
            raise ValueError(f"{t} mel frames; the codec needs 1 + {self.stride}k")
        x = (mel + MEL_OFFSET) / MEL_SCALE
        x = torch.cat([x[:, :, :1].expand(-1, -1, self.stride - 1), x], 2)  # causal: frame 0 alone
        n = x.shape[2] // self.stride
        x = x.view(b, m, n, self.stride).permute(0, 2, 3, 1).reshape(b, n, -1)
        z = self.enc(x)
        if normalise:
            z = (z - self.latent_mean) / self.latent_std
        return z.view(b, n, self.channels, self.bins).permute(0, 2, 1, 3)

    def encode(self, wave: torch.Tensor, normalise: bool = True) -> torch.Tensor:
        return self.encode_mel(self.front(wave), normalise)

    def decode_mel(self, latents: torch.Tensor, normalised: bool = True) -> torch.Tensor:
        """[B, 8, L, 16] -> log-mel [B, 64, 1 + 4(L-1)]."""
        b, c, n, f = latents.shape
        z = latents.float().permute(0, 2, 1, 3).reshape(b, n, c * f)
        if normalised:
            z = z * self.latent_std + self.latent_mean
        x = self.dec(z).view(b, n, self.stride, self.n_mels).reshape(b, n * self.stride, self.n_mels)
        x = x[:, self.stride - 1:].transpose(1, 2)
        return x * MEL_SCALE - MEL_OFFSET


# The vocoder's level stages, both per frame and stateless (a streamed decode still equals the
# whole-clip decode): generated spectra can carry e^15 times the energy of anything the world makes,
# so each STFT frame's log energy is compressed softly towards the world's loudest frames (about
# 9.7; world frames pass nearly untouched), keeping its spectral shape; then the waveform goes
# through a soft limiter whose ceiling leaves room for AAC's overshoot (files stay in full scale).
LEVEL_KNEE, LEVEL_CEILING = 9.0, 10.0  # log of a frame's summed squared magnitudes
KNEE, CEILING = 0.5, 0.8  # waveform


def soft_cap(x: torch.Tensor, knee: float, ceiling: float) -> torch.Tensor:
    """Identity below `knee`, then a tanh curve towards `ceiling` that never reaches it (no kink)."""
    span = ceiling - knee
    return torch.where(x > knee, knee + span * torch.tanh((x - knee) / span), x)


def soft_limit(x: torch.Tensor, knee: float = KNEE, ceiling: float = CEILING) -> torch.Tensor:
    return torch.sign(x) * soft_cap(x.abs(), knee, ceiling)


def level_stage(mag: torch.Tensor) -> torch.Tensor:
    """[B, bins, m] magnitudes: every frame louder than the knee turned down as a whole (a compressor)."""
    level = torch.log((mag ** 2).sum(1, keepdim=True).clamp(min=1e-30))
    return mag * torch.exp(-0.5 * (level - soft_cap(level, LEVEL_KNEE, LEVEL_CEILING)))


class Vocoder(nn.Module):
    """Procedural sinusoidal vocoder (no weights): log-mel -> linear magnitude (pseudo-inverse of the
    filterbank) -> per frame its strongest spectral peaks -> sine grains, overlap-added.

    The world sounds in tones, so a generated spectrum is rendered as the tones it holds rather than
    as noise with a guessed phase (Griffin-Lim's broadband hiss). Every frame becomes a Hann grain two
    hops long centred on its time (the grains sum to one), holding up to `peaks` sines at the frame's
    spectral peaks above `rel_floor` of its strongest. Peak frequencies are parabola-refined, then
    snapped to multiples of 25 Hz - the audio latent rate - so a sine's phase is the same at every
    latent boundary: windows decoded apart (streaming) line up with no phase jump, and each frame
    depends on its own mel frame alone."""

    QUANTUM_HZ = 25.0  # = audio latents per second: phase-periodic over one latent (4 mel frames)

    def __init__(self, out_rate: int = 24000, peaks: int = 6, rel_floor: float = 0.1, gain: float = 1.8):
        super().__init__()
        self.out_rate, self.peaks, self.rel_floor = out_rate, peaks, rel_floor
        self.gain = gain  # the pseudo-inverse spreads a peak over its neighbours: x1.8 restores world levels (RMS)
        fb = mel_filterbank()
        self.register_buffer("inv", torch.linalg.pinv(fb), persistent=False)
        # a sine of amplitude A peaks at A * sum(window) / 2 in a Hann-windowed STFT
        self.peak_scale = float(torch.hann_window(N_FFT).sum()) / 2

    @torch.no_grad()
    def forward(self, log_mel: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """[B, 64, m + 1] -> waveform [B, 160 m * out_rate / 16000] at `out_rate` Hz (`seed` is unused:
        the vocoder is deterministic; kept for callers of the former Griffin-Lim one)."""
        mag = level_stage(torch.clamp(self.inv @ torch.exp(log_mel.float()), min=0))  # [B, K, M]
        b, nbin, m = mag.shape
        left, mid, right = mag[:, :-2], mag[:, 1:-1], mag[:, 2:]
        top = mag.amax(1, keepdim=True)
        peak = (mid > left) & (mid >= right) & (mid > self.rel_floor * top) & (mid > 2e-5)
        val, idx = torch.where(peak, mid, torch.zeros_like(mid)).topk(min(self.peaks, nbin - 2), dim=1)  # [B, P, M]
        la, lb, lc = (torch.log(mag.gather(1, idx + o).clamp(min=1e-12)) for o in (0, 1, 2))
        den = la - 2 * lb + lc
        delta = torch.where(den.abs() > 1e-9, 0.5 * (la - lc) / den, torch.zeros_like(den)).clamp(-0.5, 0.5)
        freq = (idx + 1 + delta) * SAMPLE_RATE / N_FFT
        freq = (freq / self.QUANTUM_HZ).round() * self.QUANTUM_HZ
        amp = self.gain * val / self.peak_scale  # zero where no peak
        hop = self.out_rate * HOP // SAMPLE_RATE
        t = (torch.arange(m, dtype=torch.float64)[:, None] * hop + torch.arange(-hop, hop)) / self.out_rate  # [M, 2hop]
        phase = 2 * math.pi * freq.double()[..., None] * t  # [B, P, M, 2hop]
        grains = (amp.double()[..., None] * torch.sin(phase)).sum(1)  # [B, M, 2hop]
        grains = grains * torch.hann_window(2 * hop, dtype=torch.float64)
        wave = grains[:, :-1, hop:] + grains[:, 1:, :hop]  # between frames j and j + 1: two grains overlap
        return soft_limit(wave.reshape(b, (m - 1) * hop).float())  # a level stage, not clipping


class Codecs(nn.Module):
    """The toy's decoders (and encoders) in one module: what the demo needs to see and hear latents."""

    def __init__(self):
        super().__init__()
        self.video = VideoCodec()
        self.audio = AudioCodec()
        self.vocoder = Vocoder()

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        return self.video.decode(latents)

    @torch.no_grad()
    def decode_audio(self, latents: torch.Tensor, sample_rate: int = 24000) -> torch.Tensor:
        self.vocoder.out_rate = sample_rate
        return self.vocoder(self.audio.decode_mel(latents))


def load_codecs(path) -> Codecs:
    """Trained codecs from `codecs.safetensors` (a file, or the folder `toy codecs --out` wrote), frozen."""
    from safetensors.torch import load_file
    p = Path(path)
    c = Codecs()
    f = p / "codecs.safetensors" if p.is_dir() else p
    missing, unexpected = c.load_state_dict(load_file(str(f)), strict=False)
    if missing or unexpected:
        raise ValueError(f"{f} does not hold this version's toy codecs (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}): it was made by an older recipe; train them again with `toy codecs`")
    return c.eval().requires_grad_(False)


def train_codecs(codecs: Codecs, clips, steps: int = 600, lr: float = 2e-3, seed: int = 0, batch: int = 8,
                 log=print) -> dict:
    """Fit both autoencoders on a pool of world clips (`clips`: list of world.Clip), then set the
    per-channel latent statistics. Deterministic for a seed."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    pooled = torch.stack([F.avg_pool3d(c.video, (1, codecs.video.pool, codecs.video.pool)) for c in clips])
    mels = codecs.audio.front(torch.stack([c.audio for c in clips]))
    bg = torch.tensor([0.05, 0.05, 0.08]).view(1, 3, 1, 1, 1)
    params = list(codecs.video.enc.parameters()) + list(codecs.video.dec.parameters()) + \
        list(codecs.audio.enc.parameters()) + list(codecs.audio.dec.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    hist = []
    for step in range(steps):
        idx = torch.randint(len(clips), (batch,), generator=g)
        v, m = pooled[idx], mels[idx]
        zv = codecs.video.encode(v, normalise=False, pooled=True)
        rv = codecs.video.decode(zv, normalised=False, full_res=False)
        # weight object pixels up: the background is most of the frame
        w = 1 + 8 * (v - bg).abs().sum(1, keepdim=True)
        lv = (w * (rv - v) ** 2).mean()
        za = codecs.audio.encode_mel(m, normalise=False)
        ra = codecs.audio.decode_mel(za, normalised=False)
        la = ((ra - m) / MEL_SCALE).pow(2).mean()
        loss = lv + la
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        hist.append((lv.item(), la.item()))
        if step % 100 == 0 or step == steps - 1:
            log(f"codecs step {step}/{steps} video {lv.item():.5f} audio {la.item():.5f}")
    with torch.no_grad():
        zv = codecs.video.encode(pooled, normalise=False, pooled=True)
        za = codecs.audio.encode_mel(mels, normalise=False)
        codecs.video.latent_mean.copy_(zv.mean((0, 2, 3, 4)))
        codecs.video.latent_std.copy_(zv.std((0, 2, 3, 4)).clamp(min=1e-3))
        za = za.permute(0, 2, 1, 3).reshape(-1, 128)
        codecs.audio.latent_mean.copy_(za.mean(0))
        codecs.audio.latent_std.copy_(za.std(0).clamp(min=1e-3))
    return {"video_mse": hist[-1][0], "audio_mse": hist[-1][1], "first": hist[0]}


__all__ = ["VideoCodec", "AudioCodec", "MelFrontEnd", "Vocoder", "Codecs", "mel_filterbank", "mel_bin_of",
           "load_codecs", "train_codecs", "N_MELS"]
