"""Streaming temporal decode: decode latents block by block so the stream equals the offline decode.

Any decoder whose output frame depends on a bounded range of latents can be streamed exactly:
decode a window that reaches `left` latents into the past and emit only the frames whose `right`
future latents have arrived; the rest waits for the next block (or `flush()`).

The causal codec quirk: a decoder fed latents [w0, e) treats latent w0 as a *first* latent and
decodes it to ONE frame, not `stride`. So frames of window latent j >= 1 sit `stride * w0` frames
before their global index, and window latent 0 is decoded "wrong". We always start the window one
latent before the receptive field needs (a sacrificial latent) and drop its frame, which makes the
emitted frames exact for any receptive field, not just for architectures whose first layer is a
latent-rate conv. Cost: one extra latent per window.

When the receptive field is unknown or very long (vocoders), pass a smaller context and a
`crossfade`: each window's last `crossfade` output samples are held back and blended with the next
window's version of them, hiding the seam; `stream_vs_offline` measures what that costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .layout import DEFAULT_TIME, CodecTime, TimeBase

DecodeFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TemporalContext:
    """A decoder's receptive field in latents: an output frame of latent l depends on [l-left, l+right]."""

    left: int = 0
    right: int = 0

    def __post_init__(self):
        if self.left < 0 or self.right < 0:
            raise ValueError(f"context must be >= 0, got left={self.left} right={self.right}")


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
    """Push latent blocks, get back exactly the output frames (or samples) that are final.

    decode_fn: latents -> decoded; time is `latent_axis` on input and `out_axis` on output.
    codec: the causal time mapping (latent 0 -> 1 frame, others -> `stride` frames).
    samples_per_frame: output units per codec frame (1 for video; vocoder hop for audio).
    crossfade: output units blended at seams (0 = exact mode; only useful if context is too small).
    """

    def __init__(self, decode_fn: DecodeFn, codec: CodecTime, context: TemporalContext, *,
                 latent_axis: int = 2, out_axis: int = 2, samples_per_frame: int = 1, crossfade: int = 0):
        if samples_per_frame < 1 or crossfade < 0:
            raise ValueError("samples_per_frame must be >= 1 and crossfade >= 0")
        self.decode_fn = decode_fn
        self.codec = codec
        self.context = context
        self.latent_axis = latent_axis
        self.out_axis = out_axis
        self.samples_per_frame = samples_per_frame
        self.crossfade = crossfade
        self.reset()

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

    def output_length(self, n_latents: int) -> int:
        return self.codec.frames_for_latents(n_latents) * self.samples_per_frame

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
        chunk = self._emit(self._available, at_end=True)
        self._buf, self._tail, self._ended = None, None, True
        self._buf_start = self._available
        return chunk

    def _emit(self, final_latent: int, at_end: bool) -> Optional[DecodedChunk]:
        final_out = self.output_length(final_latent)
        emit_end = final_out if at_end else final_out - self.crossfade
        tail_len = 0 if self._tail is None else self._tail.shape[self.out_axis]
        # Nothing new, or not enough to cover the whole blend region yet: wait for more latents.
        if emit_end <= self._out or emit_end < self._out + tail_len:
            return None
        window_start = self._window_start(self._out)
        window = self._buf.narrow(self.latent_axis, window_start - self._buf_start, self._available - window_start)
        with torch.no_grad():
            decoded = self.decode_fn(window)
        expected = self.output_length(window.shape[self.latent_axis])
        if decoded.shape[self.out_axis] != expected:
            raise ValueError(
                f"decoder returned {decoded.shape[self.out_axis]} outputs on axis {self.out_axis} for "
                f"{window.shape[self.latent_axis]} latents; the codec (stride {self.codec.stride}, first latent = "
                f"1 frame, x{self.samples_per_frame}) expects {expected}: check out_axis / codec / samples_per_frame")
        # Window latent j >= 1 is global latent window_start + j, shifted by stride * window_start frames.
        offset = self.codec.stride * window_start * self.samples_per_frame
        fresh = decoded.narrow(self.out_axis, self._out - offset, final_out - self._out)
        if self._tail is not None:
            fresh = fresh.clone()
            head = fresh.narrow(self.out_axis, 0, tail_len)
            w = _fade_in(tail_len, self.out_axis, fresh.ndim, fresh.dtype, fresh.device)
            head.copy_(self._tail * (1 - w) + head * w)
        n_emit = emit_end - self._out
        out = fresh.narrow(self.out_axis, 0, n_emit)
        self._tail = fresh.narrow(self.out_axis, n_emit, final_out - emit_end).clone() if final_out > emit_end else None
        chunk = DecodedChunk(out, self._out, emit_end)
        self._out = emit_end
        self._trim()
        return chunk

    def _window_start(self, out_pos: int) -> int:
        """First latent to decode so output from `out_pos` on is exact (+1 sacrificial latent)."""
        first_needed = self.codec.latent_of_frame(out_pos // self.samples_per_frame)
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


class AudioStreamingDecoder(StreamingDecoder):
    """Audio VAE decoder (latents -> mel, causal) then vocoder (mel -> waveform), streamed as one codec.

    Output is waveform samples along `out_axis` (default last), `time.samples_per_mel_frame` per mel frame.
    `context` is the receptive field of the composed pipeline in audio latents (see `probe_context`).
    """

    def __init__(self, vae_decode: DecodeFn, vocoder: DecodeFn, context: TemporalContext,
                 time: TimeBase = DEFAULT_TIME, *, latent_axis: int = 2, out_axis: int = -1, crossfade: int = 0):
        self.vae_decode, self.vocoder = vae_decode, vocoder
        super().__init__(lambda z: vocoder(vae_decode(z)), time.audio, context, latent_axis=latent_axis,
                         out_axis=out_axis, samples_per_frame=time.samples_per_mel_frame, crossfade=crossfade)


# ---------------------------------------------------------------------------------------------
# measuring: receptive fields and stream-vs-offline error


def probe_context(decode_fn: DecodeFn, latents: torch.Tensor, codec: CodecTime, *, latent_axis: int = 2,
                  out_axis: int = 2, samples_per_frame: int = 1, tol: float = 0.0, seed: int = 0) -> TemporalContext:
    """Measure a decoder's receptive field by perturbing one latent at a time.

    Use float64 and a clip longer than the receptive field; the answer can't exceed the clip.
    For low-precision decoders raise `tol` above their noise floor.
    """
    g = torch.Generator().manual_seed(seed)
    n = latents.shape[latent_axis]
    with torch.no_grad():
        base = decode_fn(latents)
        left = right = 0
        for j in range(n):
            z = latents.clone()
            sl = z.narrow(latent_axis, j, 1)
            sl.add_(torch.randn(sl.shape, generator=g, dtype=sl.dtype).to(sl.device))
            diff = (decode_fn(z) - base).abs().movedim(out_axis, 0).reshape(base.shape[out_axis], -1)
            changed = torch.nonzero(diff.amax(dim=1) > tol).flatten().tolist()
            for idx in changed:
                lat = codec.latent_of_frame(idx // samples_per_frame)
                left, right = max(left, lat - j), max(right, j - lat)
    return TemporalContext(left, right)


def split_blocks(latents: torch.Tensor, sizes: Sequence[int], axis: int = 2) -> list[torch.Tensor]:
    """Cut latents into consecutive blocks; the last size repeats until the latents run out."""
    out, at, k = [], 0, 0
    total = latents.shape[axis]
    while at < total:
        size = sizes[min(k, len(sizes) - 1)]
        size = min(size, total - at)
        out.append(latents.narrow(axis, at, size))
        at, k = at + size, k + 1
    return out


@dataclass(frozen=True)
class StreamError:
    """Streamed output vs offline decode of the same latents."""

    max_abs: float  # worst error anywhere
    max_seam: float  # worst error within `seam_radius` of a chunk boundary
    rms: float
    peak: float  # max |offline|, to read the errors relative to the signal
    seams: tuple[int, ...]  # output indices where one chunk ended and the next began
    length: int  # outputs compared
    chunks_exact: bool  # every chunk equal to the offline slice at its indices (within tol)


def stream_vs_offline(decoder: StreamingDecoder, latents: torch.Tensor, block_sizes: Sequence[int], *,
                      seam_radius: Optional[int] = None, tol: float = 1e-12) -> StreamError:
    """Stream `latents` through `decoder` in blocks, decode them offline in one go, compare."""
    decoder.reset()
    ax = decoder.out_axis
    chunks = [c for b in split_blocks(latents, block_sizes, decoder.latent_axis) for c in [decoder.push(b)] if c]
    last = decoder.flush()
    if last:
        chunks.append(last)
    with torch.no_grad():
        offline = decoder.decode_fn(latents)
    streamed = torch.cat([c.data for c in chunks], dim=ax)
    if streamed.shape != offline.shape:
        raise AssertionError(f"streamed shape {tuple(streamed.shape)} != offline {tuple(offline.shape)}")
    err = (streamed - offline).abs().movedim(ax, 0).reshape(offline.shape[ax], -1).amax(dim=1).double()
    seams = tuple(c.end for c in chunks[:-1])
    radius = seam_radius if seam_radius is not None else max(1, decoder.crossfade) + decoder.samples_per_frame
    near = torch.zeros_like(err, dtype=torch.bool)
    for s in seams:
        near[max(0, s - radius):s + radius] = True
    chunks_exact = all(
        torch.allclose(c.data, offline.narrow(ax, c.start, c.length), rtol=0, atol=tol) for c in chunks)
    contiguous = all(a.end == b.start for a, b in zip(chunks, chunks[1:])) and (not chunks or chunks[0].start == 0)
    if not contiguous:
        raise AssertionError("streamed chunks are not contiguous")
    return StreamError(
        max_abs=float(err.max()) if err.numel() else 0.0,
        max_seam=float(err[near].max()) if near.any() else 0.0,
        rms=float((streamed - offline).double().pow(2).mean().sqrt()),
        peak=float(offline.abs().max()),
        seams=seams, length=int(offline.shape[ax]), chunks_exact=chunks_exact)


__all__ = [
    "TemporalContext", "DecodedChunk", "StreamingDecoder", "AudioStreamingDecoder", "probe_context",
    "split_blocks", "StreamError", "stream_vs_offline",
]
