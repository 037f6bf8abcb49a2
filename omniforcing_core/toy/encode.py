"""The embedded toy's encoders: the user's audio or video -> the student's latents (A->V, V->A).

Assets that carry the trained encoders (`toy_codecs.safetensors` with `*.enc.*` weights) use them.
The assets shipped so far carry only the decoders; then the latents are fitted to the decoders: every
latent of either codec decodes on its own through one small MLP, so each one is a separate
least-squares fit with a weak pull towards the latent mean (video: `VideoCodec.fit_latents`; audio: the
same Levenberg-Marquardt fit on the log-mel frames the audio decoder produces).
"""
from __future__ import annotations

import torch

from .codecs import MEL_OFFSET, MEL_SCALE, AudioCodec, Codecs, _lm_fit
from .world import HOP, SAMPLE_RATE


def has_encoders(codecs: Codecs) -> bool:
    """True when the codecs were loaded with their trained encoders (`toy.default` sets the flag)."""
    return bool(getattr(codecs, "trained_encoders", False))


@torch.no_grad()
def encode_video(codecs: Codecs, frames: torch.Tensor) -> torch.Tensor:
    """[B, 3, 1 + 8k, H, W] in [0, 1] (H, W multiples of 32) -> normalised latents [B, 128, 1 + k, H/32, W/32]."""
    if has_encoders(codecs):
        return codecs.video.encode(frames.float())
    return codecs.video.fit_latents(frames.float())


@torch.no_grad()
def fit_audio_latents(codec: AudioCodec, log_mel: torch.Tensor, iters: int = 10, prior: float = 1e-2,
                      chunk: int = 512) -> torch.Tensor:
    """log-mel [B, 64, 1 + 4k] -> the normalised latents [B, 8, 1 + k, 16] whose decode is closest to it.
    Latent 0 is fitted to the one mel frame the decoder keeps of it."""
    b, m, t = log_mel.shape
    s = codec.stride
    if (t - 1) % s:
        raise ValueError(f"{t} mel frames; the audio codec needs 1 + {s}k")
    x = (log_mel.float() + MEL_OFFSET) / MEL_SCALE
    x = torch.cat([x[:, :, :1].expand(-1, -1, s - 1), x], 2)
    n = x.shape[2] // s
    rows = x.view(b, m, n, s).permute(0, 2, 3, 1).reshape(b, n, s * m)  # the decoder's (frame, mel) order
    lin1, lin2 = codec.dec[0], codec.dec[2]
    std, mean = codec.latent_std.float(), codec.latent_mean.float()
    w1 = lin1.weight.float() * std
    c1 = lin1.weight.float() @ mean + lin1.bias.float()
    w2, b2 = lin2.weight.float(), lin2.bias.float()
    keep0 = torch.zeros(s, m, device=w2.device)
    keep0[-1] = 1  # decode_mel drops the first stride - 1 frames of latent 0
    masks = (keep0.flatten(), torch.ones(s * m, device=w2.device))
    z = torch.empty(b, n, w1.shape[1], device=w2.device)
    for first, sl in ((True, slice(0, 1)), (False, slice(1, n))):
        part = rows[:, sl].reshape(-1, s * m)
        if len(part):
            fit = [_lm_fit(p, masks[0 if first else 1], w1, c1, w2, b2, iters, prior) for p in part.split(chunk)]
            z[:, sl] = torch.cat(fit).view(b, -1, w1.shape[1])
    return z.view(b, n, codec.channels, codec.bins).permute(0, 2, 1, 3).contiguous()


@torch.no_grad()
def encode_audio(codecs: Codecs, wave: torch.Tensor) -> torch.Tensor:
    """Mono [B, 160 * 4k] at 16 kHz -> normalised latents [B, 8, 1 + k, 16] (the codec's log-mel front end
    gives 1 + 4k frames)."""
    if wave.shape[-1] % (HOP * 4):
        raise ValueError(f"{wave.shape[-1]} samples; the toy audio codec needs a multiple of {HOP * 4} at "
                         f"{SAMPLE_RATE} Hz")
    if has_encoders(codecs):
        return codecs.audio.encode(wave.float())
    return fit_audio_latents(codecs.audio, codecs.audio.front(wave.float()))


__all__ = ["has_encoders", "encode_video", "fit_audio_latents", "encode_audio"]
