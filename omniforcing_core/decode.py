"""Streaming temporal decode of one modality: latents block by block, output equal to the offline decode.

A `Decoder` is a temporal decoder as data: the function, where time runs in and out, and its reach
(`TemporalContext`: an output frame of latent l depends on latents [l - left, l + right]). Any decoder
with a bounded reach streams exactly: decode a window that reaches `left` latents into the past and emit
only the frames whose `right` future latents have arrived; the rest waits for the next block (or
`flush()`).

The causal codec quirk: a decoder fed latents [w0, e) treats latent w0 as a *first* latent and decodes
it to ONE frame, not `stride`. So frames of window latent j >= 1 sit `stride * w0` frames before their
global index, and window latent 0 is decoded "wrong". We always start the window one latent before the
reach needs (a sacrificial latent) and drop its frame, which makes the emitted frames exact for any
reach, not just for architectures whose first layer is a latent-rate conv. Cost: one extra latent per
window.

When the reach is unknown or very long (vocoders), give a smaller reach and a `crossfade`: each window's
last `crossfade` output units are held back and blended with the next window's version of them, hiding
the seam.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from .layout import DEFAULT_TIME, CodecTime, TimeBase

DecodeFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TemporalContext:
    """A decoder's reach in latents: an output frame of latent l depends on [l-left, l+right]."""

    left: int = 0
    right: int = 0

    def __post_init__(self):
        if self.left < 0 or self.right < 0:
            raise ValueError(f"context must be >= 0, got left={self.left} right={self.right}")

    def cap(self, other: "TemporalContext") -> "TemporalContext":
        """The smaller reach on each side."""
        return TemporalContext(min(self.left, other.left), min(self.right, other.right))

    def covers(self, other: "TemporalContext") -> bool:
        return self.left >= other.left and self.right >= other.right


@dataclass(frozen=True)
class Decoder:
    """A temporal decoder: `fn(latents) -> output`, time on `latent_axis` in and `out_axis` out.

    codec: the causal time mapping (latent 0 -> 1 frame, others -> `stride` frames).
    reach: how far an output frame looks (None: unknown; measure it with `probe_reach`).
    samples_per_frame: output units per codec frame (1 for video; the vocoder hop for audio).
    crossfade: output units blended at seams; only for a reach shorter than the true one (0 = exact).
    """

    fn: DecodeFn
    codec: CodecTime
    reach: Optional[TemporalContext]
    latent_axis: int = 2
    out_axis: int = 2
    samples_per_frame: int = 1
    crossfade: int = 0

    def __post_init__(self):
        if self.samples_per_frame < 1 or self.crossfade < 0:
            raise ValueError("samples_per_frame must be >= 1 and crossfade >= 0")

    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return self.fn(latents)

    def output_length(self, n_latents: int) -> int:
        return self.codec.frames_for_latents(n_latents) * self.samples_per_frame

    def with_reach(self, reach: TemporalContext, crossfade: Optional[int] = None) -> "Decoder":
        return dataclasses.replace(self, reach=reach, crossfade=self.crossfade if crossfade is None else crossfade)


def video_decoder(fn: DecodeFn, reach: Optional[TemporalContext], time: TimeBase = DEFAULT_TIME) -> Decoder:
    """A video decoder in ComfyUI's layout: latents [B, 128, F, h, w] -> frames [B, 1 + 8(F-1), H, W, 3]."""
    return Decoder(fn, time.video, reach, latent_axis=2, out_axis=1)


def audio_decoder(fn: DecodeFn, reach: Optional[TemporalContext], time: TimeBase = DEFAULT_TIME, *,
                  crossfade_mel_frames: int = 0) -> Decoder:
    """An audio decoder (VAE + vocoder): latents [B, 8, T, 16] -> waveform [B, C, (4T-3) * hop]."""
    spf = time.samples_per_mel_frame
    return Decoder(fn, time.audio, reach, latent_axis=2, out_axis=-1, samples_per_frame=spf,
                   crossfade=crossfade_mel_frames * spf)


@dataclass(frozen=True)
class DecodedChunk:
    """Output indices [start, end) along the output time axis; never revised later."""

    data: torch.Tensor
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


class StreamingDecoder:
    """Push latent blocks of one `Decoder`, get back exactly the output frames (or samples) that are final."""

    def __init__(self, decoder: Decoder):
        if decoder.reach is None:
            raise ValueError("the decoder's reach is unknown: measure it with decode.probe_reach or give one")
        self.decoder = decoder
        self.reset()

    # the Decoder's fields, read often
    @property
    def latent_axis(self) -> int:
        return self.decoder.latent_axis

    @property
    def out_axis(self) -> int:
        return self.decoder.out_axis

    @property
    def context(self) -> TemporalContext:
        return self.decoder.reach

    def reset(self) -> None:
        self._buf: Optional[torch.Tensor] = None  # latents [buf_start, available)
        self._buf_start = 0
        self._available = 0
        self._out = 0  # output units emitted so far
        self._tail: Optional[torch.Tensor] = None  # provisional output [out, out + len) for the crossfade
        self._ended = False

    # -- bookkeeping ----------------------------------------------------------------------
    @property
    def latents_seen(self) -> int:
        return self._available

    @property
    def emitted(self) -> int:
        """Output units (frames or samples) emitted so far."""
        return self._out

    @property
    def held_latents(self) -> int:
        """Latents kept as context: bounded by left + 1 + right + one block."""
        return 0 if self._buf is None else self._buf.shape[self.latent_axis]

    # -- streaming --------------------------------------------------------------------------
    def push(self, latents: torch.Tensor) -> Optional[DecodedChunk]:
        """Add a block of latents; return the newly final output, or None if nothing is final yet."""
        if self._ended:
            raise RuntimeError("push() after flush(): call reset() to start a new stream")
        n = latents.shape[self.latent_axis]
        if n == 0:
            return None
        self._buf = latents if self._buf is None else torch.cat([self._buf, latents], dim=self.latent_axis)
        self._available += n
        return self._emit(self._available - self.context.right, at_end=False)

    def flush(self) -> Optional[DecodedChunk]:
        """End of stream: emit everything left (the held-back frames and the crossfade tail)."""
        chunk = self._emit(self._available, at_end=True) if self._buf is not None else None
        self._buf, self._tail, self._ended = None, None, True
        self._buf_start = self._available
        return chunk

    def _emit(self, final_latent: int, at_end: bool) -> Optional[DecodedChunk]:
        d = self.decoder
        final_out = d.output_length(final_latent)
        emit_end = final_out if at_end else final_out - d.crossfade
        tail_len = 0 if self._tail is None else self._tail.shape[d.out_axis]
        # Nothing new, or not enough to cover the whole blend region yet: wait for more latents.
        if emit_end <= self._out or emit_end < self._out + tail_len:
            return None
        window_start = self._window_start(self._out)
        window = self._buf.narrow(d.latent_axis, window_start - self._buf_start, self._available - window_start)
        with torch.no_grad():
            decoded = d.fn(window)
        expected = d.output_length(window.shape[d.latent_axis])
        if decoded.shape[d.out_axis] != expected:
            raise ValueError(
                f"decoder returned {decoded.shape[d.out_axis]} outputs on axis {d.out_axis} for "
                f"{window.shape[d.latent_axis]} latents; the codec (stride {d.codec.stride}, first latent = "
                f"1 frame, x{d.samples_per_frame}) expects {expected}: check out_axis / codec / samples_per_frame")
        # Window latent j >= 1 is global latent window_start + j, shifted by stride * window_start frames.
        offset = d.codec.stride * window_start * d.samples_per_frame
        fresh = decoded.narrow(d.out_axis, self._out - offset, final_out - self._out)
        if self._tail is not None:
            fresh = fresh.clone()
            head = fresh.narrow(d.out_axis, 0, tail_len)
            w = _fade_in(tail_len, d.out_axis, fresh.ndim, fresh.dtype, fresh.device)
            head.copy_(self._tail * (1 - w) + head * w)
        n_emit = emit_end - self._out
        out = fresh.narrow(d.out_axis, 0, n_emit)
        self._tail = fresh.narrow(d.out_axis, n_emit, final_out - emit_end).clone() if final_out > emit_end else None
        chunk = DecodedChunk(out, self._out, emit_end)
        self._out = emit_end
        self._trim()
        return chunk

    def _window_start(self, out_pos: int) -> int:
        """First latent to decode so output from `out_pos` on is exact (+1 sacrificial latent)."""
        first_needed = self.decoder.codec.latent_of_frame(out_pos // self.decoder.samples_per_frame)
        return max(0, first_needed - self.context.left - 1)

    def _trim(self) -> None:
        """Drop latents no future window will read: memory stays bounded on endless streams."""
        keep_from = self._window_start(self._out)
        drop = keep_from - self._buf_start
        if drop > 0:
            self._buf = self._buf.narrow(self.latent_axis, drop, self._buf.shape[self.latent_axis] - drop).clone()
            self._buf_start = keep_from


def _fade_in(n: int, axis: int, ndim: int, dtype, device) -> torch.Tensor:
    """Raised-cosine weights 0 -> 1 over n samples, shaped to broadcast along `axis`."""
    t = (torch.arange(n, dtype=torch.float64, device=device) + 0.5) / n
    w = (0.5 - 0.5 * torch.cos(math.pi * t)).to(dtype)
    shape = [1] * ndim
    shape[axis] = n
    return w.reshape(shape)


# ---------------------------------------------------------------------------------------------
# measuring a decoder's reach


class ProbedReach(NamedTuple):
    reach: TemporalContext
    saturated: bool  # the reach touched the probe's ends: the true reach may be larger (probe longer)


def probe_reach(decoder: Decoder, latents: torch.Tensor, *, tol: float = 0.0, seed: int = 0) -> ProbedReach:
    """A decoder's reach from perturbing two latents in the middle of `latents` (3 decodes).

    Convolutional decoders reach equally far from every interior latent, so two probes suffice. Use a
    clip longer than twice the reach (the answer cannot exceed it: `saturated` says when it may) and,
    for low-precision decoders, a `tol` above their noise floor. `decoder.reach` is ignored."""
    n = latents.shape[decoder.latent_axis]
    if n < 5:
        raise ValueError(f"probe_reach needs at least 5 latents, got {n}")
    g = torch.Generator().manual_seed(seed)
    left = right = 0
    saturated = False
    ax = decoder.out_axis
    with torch.no_grad():
        base = decoder.fn(latents)
        for j in (n // 2, n // 2 + 1):
            z = latents.clone()
            sl = z.narrow(decoder.latent_axis, j, 1)
            sl.add_(torch.randn(sl.shape, generator=g, dtype=sl.dtype).to(sl.device))
            diff = (decoder.fn(z) - base).abs().movedim(ax, 0).reshape(base.shape[ax], -1).amax(dim=1)
            changed = torch.nonzero(diff > tol).flatten().tolist()
            if not changed:
                continue
            lats = [decoder.codec.latent_of_frame(i // decoder.samples_per_frame) for i in changed]
            lo, hi = min(lats), max(lats)
            left, right = max(left, hi - j), max(right, j - lo)
            saturated |= lo <= 1 or hi >= n - 1
    return ProbedReach(TemporalContext(left, right), saturated)


__all__ = [
    "DecodeFn", "TemporalContext", "Decoder", "video_decoder", "audio_decoder", "DecodedChunk", "StreamingDecoder",
    "ProbedReach", "probe_reach",
]
