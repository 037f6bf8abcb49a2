"""Running a stream into live files: how far the decoders look, and a loop that survives a cancel.

Built on `av_stream.AVStreamer` (decode each block, write it to the live fMP4/HLS):
* `DecodePlan` says how far each decoder looks around a block. The exact plan uses the decoder's
  measured reach (`measure_context`): the stream then equals decoding the whole clip at once, at
  the cost of latency (LTX-2's video VAE is non-causal and reaches ~14 latents = 4.7 s each way)
  and of context decoded again per block. The presets trade that for a short look-ahead.
* `run_stream` feeds a sampler's blocks to the streamer; whatever stops it (the end, an error, a
  host's cancel), what was generated is decoded, written and the files are closed valid before it
  re-raises, and it keeps what the caller wants to return as whole clips.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from .decode import DecodeFn, TemporalContext
from .layout import CodecTime


@dataclass(frozen=True)
class DecodePlan:
    """Context (in latents) of the video and audio decoders, and the audio seam crossfade (samples)."""

    video: TemporalContext
    audio: TemporalContext
    audio_crossfade: int = 0


# Left context only costs compute; right context is latency.
PRESETS = {
    "balanced": lambda spf: DecodePlan(TemporalContext(6, 3), TemporalContext(16, 3), 4 * spf),
    "fast": lambda spf: DecodePlan(TemporalContext(2, 1), TemporalContext(8, 1), 4 * spf),
}


def measure_context(decode_fn: DecodeFn, latents: torch.Tensor, codec: CodecTime, *, latent_axis: int = 2,
                    out_axis: int = 2, samples_per_frame: int = 1, tol: float = 0.0) -> tuple[TemporalContext, bool]:
    """A decoder's receptive field from perturbing two latents in the middle of `latents` (3 decodes).

    Convolutional decoders reach equally far from every interior latent, so two probes suffice
    (`decode.probe_context` perturbs every latent: exact near the ends too, n + 1 decodes).
    Returns (context, saturated): saturated means the reach touched the clip's ends, i.e. the true
    receptive field may be larger than measured (pass more latents)."""
    n = latents.shape[latent_axis]
    if n < 5:
        raise ValueError(f"measure_context needs at least 5 latents, got {n}")
    g = torch.Generator().manual_seed(0)
    left = right = 0
    saturated = False
    with torch.no_grad():
        base = decode_fn(latents)
        for j in (n // 2, n // 2 + 1):
            z = latents.clone()
            sl = z.narrow(latent_axis, j, 1)
            sl.add_(torch.randn(sl.shape, generator=g, dtype=sl.dtype).to(sl.device))
            diff = (decode_fn(z) - base).abs().movedim(out_axis, 0).reshape(base.shape[out_axis], -1).amax(dim=1)
            changed = torch.nonzero(diff > tol).flatten().tolist()
            if not changed:
                continue
            lats = [codec.latent_of_frame(i // samples_per_frame) for i in changed]
            lo, hi = min(lats), max(lats)
            left, right = max(left, hi - j), max(right, j - lo)
            saturated |= lo <= 1 or hi >= n - 1
    return TemporalContext(left, right), saturated


@dataclass
class StreamRun:
    """What a stream produced (kept parts only) and how it ended."""

    blocks: int = 0
    frames: list = field(default_factory=list)  # [N, H, W, 3] chunks (if kept)
    waves: list = field(default_factory=list)  # [C, S] chunks (if kept)
    last_frame: Optional[torch.Tensor] = None
    num_frames: int = 0
    num_samples: int = 0
    interrupted: Optional[BaseException] = None

    def video(self) -> Optional[torch.Tensor]:
        return torch.cat(self.frames) if self.frames else None

    def audio(self) -> Optional[torch.Tensor]:
        return torch.cat(self.waves, dim=-1) if self.waves else None


def run_stream(blocks: Iterable, streamer, *, keep_video: bool = True, keep_audio: bool = True,
               on_block: Optional[Callable[[object, object], None]] = None) -> StreamRun:
    """Push every `BlockResult` of `blocks` through `streamer` (an `AVStreamer`), then finish it.

    on_block(block_result, chunk) runs after each block (progress, previews, UI events). Any
    exception stops generation; the blocks made so far are still decoded and written and the
    files closed, then the exception propagates (so a host's cancel keeps valid, playable files)."""
    run = StreamRun()

    def keep(chunk):
        if chunk.frames is not None and chunk.frames.shape[0]:
            run.last_frame = chunk.frames[-1].cpu()
            run.num_frames += chunk.frames.shape[0]
            if keep_video:
                run.frames.append(chunk.frames.cpu())
        if chunk.audio is not None:
            run.num_samples += chunk.audio.shape[-1]
            if keep_audio:
                run.waves.append(chunk.audio.cpu())

    try:
        for res in blocks:
            chunk = streamer.push(res)
            keep(chunk)
            run.blocks += 1
            if on_block is not None:
                on_block(res, chunk)
    except BaseException as e:  # noqa: BLE001 - also the host's interrupt, which is not an Exception
        run.interrupted = e
    try:
        keep(streamer.finish())
    except BaseException:  # noqa: BLE001
        if run.interrupted is None:
            raise
        # already stopping: keep the first reason (the writer closes inside finish)
        if getattr(streamer, "writer", None) is not None:
            try:
                streamer.writer.close()
            except Exception:  # noqa: BLE001
                pass
    if run.interrupted is not None:
        raise run.interrupted
    return run


__all__ = ["DecodePlan", "PRESETS", "measure_context", "StreamRun", "run_stream"]
