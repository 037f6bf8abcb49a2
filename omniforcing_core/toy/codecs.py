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
    def __init__(self, channels: int = 128, hidden: int = 256, pool: int = 4, spatial: int = 32, stride: int = 8):
        super().__init__()
        self.channels, self.pool, self.spatial, self.stride = channels, pool, spatial, stride
        self.patch = spatial // pool
        d = 3 * stride * self.patch * self.patch
        self.enc = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, channels))
        self.dec = nn.Sequential(nn.Linear(channels, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.register_buffer("latent_mean", torch.zeros(channels))
        self.register_buffer("latent_std", torch.ones(channels))

    def _groups(self, video: torch.Tensor, pooled: bool = False) -> torch.Tensor:
        b, c, f, h, w = video.shape
        if (f - 1) % self.stride:
            raise ValueError(f"video has {f} frames; the codec needs 1 + {self.stride}k")
        x = F.avg_pool3d(video, (1, self.pool, self.pool)) if self.pool > 1 and not pooled else video
        x = torch.cat([x[:, :, :1].expand(-1, -1, self.stride - 1, -1, -1), x], 2)  # causal: frame 0 alone
        p, s = self.patch, self.stride
        n, hh, ww = x.shape[2] // s, x.shape[3] // p, x.shape[4] // p
        x = x.view(b, c, n, s, hh, p, ww, p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return x.reshape(b, n, hh, ww, c * s * p * p)

    def encode(self, video: torch.Tensor, normalise: bool = True, pooled: bool = False) -> torch.Tensor:
        """[B, 3, F, H, W] in [0, 1] -> [B, 128, 1 + (F-1)/8, H/32, W/32] (`pooled`: input already at 1/4 size)."""
        z = self.enc(self._groups(video * 2 - 1, pooled)).permute(0, 4, 1, 2, 3)
        if normalise:
            z = (z - self.latent_mean.view(1, -1, 1, 1, 1)) / self.latent_std.view(1, -1, 1, 1, 1)
        return z

    def decode(self, latents: torch.Tensor, normalised: bool = True, full_res: bool = True) -> torch.Tensor:
        """[B, 128, L, h, w] -> [B, 3, 1 + 8(L-1), 32h, 32w] in [0, 1] (pooled size if not full_res)."""
        z = latents.float()
        if normalised:
            z = z * self.latent_std.view(1, -1, 1, 1, 1) + self.latent_mean.view(1, -1, 1, 1, 1)
        b, _, n, hh, ww = z.shape
        p, s = self.patch, self.stride
        x = self.dec(z.permute(0, 2, 3, 4, 1)).view(b, n, hh, ww, 3, s, p, p)
        x = x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, 3, n * s, hh * p, ww * p)[:, :, s - 1:]
        x = (x + 1) / 2
        if full_res and self.pool > 1:
            f = x.shape[2]
            x = F.interpolate(x.transpose(1, 2).reshape(b * f, 3, hh * p, ww * p), scale_factor=self.pool,
                              mode="bilinear", align_corners=False)
            x = x.view(b, f, 3, hh * p * self.pool, ww * p * self.pool).transpose(1, 2)
        return x.clamp(0, 1)

    @torch.no_grad()
    def fit_latents(self, video: torch.Tensor, iters: int = 10, prior: float = 1e-2, pooled: bool = False,
                    chunk: int = 256) -> torch.Tensor:
        """[B, 3, F, H, W] in [0, 1] -> the normalised latents whose decode is closest to it (at the
        codec's pooled size, where the encoder works too; `pooled`: the input is at that size already).

        An encoder for decoders shipped alone (the embedded toy keeps only its decoders). The decoder is
        one small MLP per latent, so each latent is its own 128-unknown least-squares fit: Levenberg-
        Marquardt with the Jacobian written out (no autograd: ComfyUI runs nodes in inference mode) and a
        weak pull towards the latent mean (`prior`; 1e-2 keeps world clips' latents at about unit scale,
        as the trained encoder's, for 1 % more error). Latent 0 is fitted to the one frame the decoder
        keeps of it."""
        target = self._groups(video.float() * 2 - 1, pooled)  # [B, n, hh, ww, d], latent 0 = frame 0 repeated
        b, n, hh, ww, d = target.shape
        lin1, lin2 = self.dec[0], self.dec[2]
        std, mean = self.latent_std.float(), self.latent_mean.float()
        w1 = lin1.weight.float() * std  # the first layer acting on normalised latents
        c1 = lin1.weight.float() @ mean + lin1.bias.float()
        w2, b2 = lin2.weight.float(), lin2.bias.float()
        keep0 = torch.zeros(3, self.stride, self.patch * self.patch, device=w2.device)
        keep0[:, -1] = 1  # decode() drops the first stride - 1 frames of latent 0
        masks = (keep0.flatten(), torch.ones(d, device=w2.device))
        z = torch.empty(b, n, hh, ww, self.channels, device=w2.device)
        for first, sl in ((True, slice(0, 1)), (False, slice(1, n))):
            rows = target[:, sl].reshape(-1, d)
            if not len(rows):
                continue
            out = [_lm_fit(x, masks[0 if first else 1], w1, c1, w2, b2, iters, prior) for x in rows.split(chunk)]
            z[:, sl] = torch.cat(out).view(b, -1, hh, ww, self.channels)
        return z.permute(0, 4, 1, 2, 3).contiguous()


def _gelu_grad(a: torch.Tensor) -> torch.Tensor:
    """d/da of the exact (erf) GELU: Phi(a) + a * phi(a)."""
    return 0.5 * (1 + torch.erf(a / math.sqrt(2))) + a * torch.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)


def _lm_fit(x, mask, w1, c1, w2, b2, iters: int, prior: float) -> torch.Tensor:
    """min_z |mask * (W2 gelu(W1 z + c1) + b2 - x)|^2 + prior |z|^2 for each row of x, by Levenberg-
    Marquardt (a step that does not lower a row's loss is refused and that row's damping raised)."""
    gram = (w2 * mask[:, None]).T @ w2  # W2^T diag(mask) W2: J^T J needs no [rows, d, 128] Jacobian
    eye = torch.eye(w1.shape[1], device=w1.device)

    def loss(z):
        a = z @ w1.T + c1
        r = (torch.nn.functional.gelu(a) @ w2.T + b2 - x) * mask
        return a, r, (r * r).sum(1) + prior * (z * z).sum(1)

    z = torch.zeros(x.shape[0], w1.shape[1], device=w1.device)
    damping = torch.full((x.shape[0], 1, 1), 1.0, device=w1.device)  # cautious first steps: bolder ones (1e-2,
    # shrinking faster) end in worse minima of this non-convex fit
    a, r, cur = loss(z)
    for _ in range(iters):
        gp = _gelu_grad(a)
        jw = gp[:, :, None] * w1  # diag(gelu') W1, [rows, hidden, 128]
        jtj = jw.transpose(1, 2) @ gram @ jw
        jtr = ((r @ w2) * gp) @ w1 + prior * z
        h = jtj + prior * eye
        step = torch.linalg.solve(h + damping * torch.diagonal(h, dim1=1, dim2=2).mean(1)[:, None, None] * eye,
                                  jtr)
        a_new, r_new, new = loss(z - step)
        better = new < cur
        z = torch.where(better[:, None], z - step, z)
        a = torch.where(better[:, None], a_new, a)
        r = torch.where(better[:, None], r_new, r)
        cur = torch.where(better, new, cur)
        damping = torch.where(better[:, None, None], damping / 2, damping * 4)
    return z


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
    """Procedural vocoder: log-mel -> linear magnitude (pseudo-inverse of the filterbank) -> Griffin-Lim."""

    def __init__(self, iters: int = 24, out_rate: int = 24000):
        super().__init__()
        self.iters, self.out_rate = iters, out_rate
        fb = mel_filterbank()
        self.register_buffer("inv", torch.linalg.pinv(fb), persistent=False)
        self.register_buffer("window", torch.hann_window(N_FFT), persistent=False)

    @torch.no_grad()
    def forward(self, log_mel: torch.Tensor, seed: int = 0) -> torch.Tensor:
        """[B, 64, m + 1] -> waveform [B, 160 m * out_rate / 16000] at `out_rate` Hz."""
        mag = level_stage(torch.clamp(self.inv @ torch.exp(log_mel.float()), min=0))
        mag = torch.where(mag < 2e-5, torch.zeros_like(mag), mag)
        n = HOP * (mag.shape[-1] - 1)
        g = torch.Generator().manual_seed(seed)
        phase = torch.exp(2j * math.pi * torch.rand(mag.shape, generator=g)).to(torch.complex64)
        wave = None
        for _ in range(self.iters):
            wave = torch.istft(mag * phase, N_FFT, HOP, window=self.window, center=True, length=n)
            spec = torch.stft(wave, N_FFT, HOP, window=self.window, center=True, pad_mode="reflect",
                              return_complex=True)
            phase = spec / spec.abs().clamp(min=1e-8)
        wave = torch.istft(mag * phase, N_FFT, HOP, window=self.window, center=True, length=n)
        if self.out_rate != SAMPLE_RATE:
            out_n = int(round(n * self.out_rate / SAMPLE_RATE))
            wave = F.interpolate(wave[:, None], size=out_n, mode="linear", align_corners=False)[:, 0]
        return soft_limit(wave)  # a level stage, not clipping


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
    c.load_state_dict(load_file(str(p / "codecs.safetensors" if p.is_dir() else p)), strict=False)
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
