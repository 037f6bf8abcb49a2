"""Streaming decode vs offline decode, and the exhaustive (per-latent) reach probe."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from omniforcing_core.decode import Decoder, StreamingDecoder, TemporalContext


def split_blocks(latents: torch.Tensor, sizes: Sequence[int], axis: int = 2) -> list[torch.Tensor]:
    """Cut latents into consecutive blocks; the last size repeats until the latents run out."""
    out, at, k = [], 0, 0
    total = latents.shape[axis]
    while at < total:
        size = min(sizes[min(k, len(sizes) - 1)], total - at)
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


def stream_vs_offline(decoder: Decoder, latents: torch.Tensor, block_sizes: Sequence[int], *,
                      seam_radius: Optional[int] = None, tol: float = 1e-12) -> StreamError:
    """Stream `latents` through `decoder` in blocks, decode them offline in one go, compare."""
    stream = StreamingDecoder(decoder)
    ax = decoder.out_axis
    chunks = [c for b in split_blocks(latents, block_sizes, decoder.latent_axis) for c in [stream.push(b)] if c]
    last = stream.flush()
    if last:
        chunks.append(last)
    with torch.no_grad():
        offline = decoder.fn(latents)
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


def probe_reach_per_latent(decoder: Decoder, latents: torch.Tensor, *, tol: float = 0.0,
                           seed: int = 0) -> TemporalContext:
    """A decoder's reach by perturbing every latent in turn (n + 1 decodes): exact near the clip's ends too,
    where `decode.probe_reach` (two interior latents, 3 decodes) assumes every latent reaches equally far."""
    g = torch.Generator().manual_seed(seed)
    n, ax = latents.shape[decoder.latent_axis], decoder.out_axis
    with torch.no_grad():
        base = decoder.fn(latents)
        left = right = 0
        for j in range(n):
            z = latents.clone()
            sl = z.narrow(decoder.latent_axis, j, 1)
            sl.add_(torch.randn(sl.shape, generator=g, dtype=sl.dtype).to(sl.device))
            diff = (decoder.fn(z) - base).abs().movedim(ax, 0).reshape(base.shape[ax], -1)
            for idx in torch.nonzero(diff.amax(dim=1) > tol).flatten().tolist():
                lat = decoder.codec.latent_of_frame(idx // decoder.samples_per_frame)
                left, right = max(left, lat - j), max(right, j - lat)
    return TemporalContext(left, right)
