"""Memory a stream needs, checked before it is taken: the KV cache for the length (or window) and
one block's activations, against what the device has free. A stream that cannot fit fails at once
with the number and the fix, not minutes later in the allocator."""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .cache import CachePolicy, StreamCache
from .layout import Clip

HEADROOM = 256 * 2 ** 20  # kernels' workspaces, small tensors
TRAINED_BLOCKS = 5  # the released student was trained on 5-block clips (121 frames, 5 s)


class ResourceError(MemoryError):
    """A run that cannot fit; the message gives the numbers and the fix."""


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB"


def activation_bytes(model, clip: Clip, cache: StreamCache) -> int:
    """One block's activations at their peak, including attention scores when a kernel
    materialises them (queries x every key the block reads)."""
    cfg, (h, w) = model.config, clip.grid
    lay = clip.layout
    b0, b1 = lay.block(0), lay.block(1)
    nv = max(b0.video_len, b1.video_len) * h * w
    na = max(b0.audio_tokens, b1.audio_tokens)
    keys_v = cache.valid_len_after(clip.num_blocks, "video_self")
    per_item = 16 * (nv * cfg.video_dim + na * cfg.audio_dim) + cfg.video_heads * nv * keys_v
    return cache.batch * cache.itemsize * per_item


def stream_bytes(model, clip: Clip, policy: CachePolicy, batch: int, dtype: torch.dtype) -> int:
    """Bytes besides the weights: the KV cache after the clip's last block (or at its window) plus
    one block's activations."""
    cache = model.new_cache(clip.layout, clip.grid, policy, batch, dtype=dtype)
    return cache.estimate_bytes(clip.num_blocks) + activation_bytes(model, clip, cache) + HEADROOM


def available_bytes(device) -> Optional[int]:
    """Free memory where the stream runs: the GPU's free memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(need: int, device, what: str, fix: str) -> None:
    free = available_bytes(device)
    if free is not None and need > free:
        raise ResourceError(f"{what} needs {gib(need)} but only {gib(free)} is free on {torch.device(device)}; "
                            f"{fix}")


def check_stream(model, clip: Clip, policy: CachePolicy, batch: int, dtype: torch.dtype) -> int:
    """Refuse a stream whose cache + activations cannot fit; returns the bytes it needs."""
    if clip.num_blocks is None and policy.window is None:
        # open-ended keep-all: the first blocks here, each later growth of the cache as it comes
        clip = dataclasses.replace(clip, num_blocks=2)
    need = stream_bytes(model, clip, policy, batch, dtype)
    if policy.window is None:
        fix = (f"use a rolling window (e.g. window=4) so the cache stays at "
               f"{gib(stream_bytes(model, clip, CachePolicy(4), batch, dtype))}, or fewer seconds / a smaller frame")
    else:
        fix = "use a smaller frame size or a smaller window"
    check_fits(need, model.device, f"a {clip.width}x{clip.height} stream of "
               f"{'an open-ended length' if clip.num_blocks is None else f'{clip.num_blocks} s'}", fix)
    return need


__all__ = ["ResourceError", "stream_bytes", "available_bytes", "check_fits", "check_stream"]


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """The cache a stream will use and what it costs, known before anything is allocated."""

    policy: CachePolicy
    cache_bytes: int  # the KV cache after the clip's last block (or once the window is full)
    total_bytes: int  # + one block's activations + headroom
    reason: str

    def describe(self) -> str:
        what = "keep-all" if self.policy.window is None else f"window {self.policy.window}"
        return (f"KV cache {what}: {gib(self.cache_bytes)} + activations = {gib(self.total_bytes)} "
                f"({self.reason})")


def plan_cache(model, clip: Clip, window: Optional[int] = None, batch: int = 1, dtype: Optional[torch.dtype] = None,
               trained_blocks: int = TRAINED_BLOCKS, rebase_rope: bool = False) -> CachePlan:
    """The cache policy for a stream and its memory, for showing before running.

    window: a number of history blocks, 0 to keep everything, or None to choose: keep everything for a
    clip no longer than the model's training length, else a window of `trained_blocks - 1` (the sink
    block + that many = the context the model was trained on; the cache stays flat however long the
    stream, where keep-all grows without bound and the model never saw such contexts)."""
    dtype = dtype or model.dtype
    long = clip.num_blocks is None or clip.num_blocks > trained_blocks
    if window is None and long:
        policy = CachePolicy(window=max(1, trained_blocks - 1), rebase_rope=rebase_rope)
        length = "an open-ended stream" if clip.num_blocks is None else f"{clip.num_blocks} s"
        reason = (f"default for {length}, longer than the {trained_blocks} s the model was trained on; "
                  f"window=0 keeps everything")
    elif window is None or window == 0:
        policy = CachePolicy()
        reason = "keeps every block" + ("" if window == 0 else f" (the clip fits the {trained_blocks} s trained length)")
    else:
        policy = CachePolicy(window=window, rebase_rope=rebase_rope)
        reason = "as asked"
    sized = clip if clip.num_blocks is not None or policy.window is not None else dataclasses.replace(clip, num_blocks=2)
    cache = model.new_cache(clip.layout, clip.grid, policy, batch, dtype=dtype)
    cache_bytes = cache.estimate_bytes(sized.num_blocks)
    total = cache_bytes + activation_bytes(model, sized, cache) + HEADROOM
    if clip.num_blocks is None and policy.window is None:
        reason += (f"; an open-ended keep-all cache grows by a chunk every {policy.chunk_blocks} blocks, checked as "
                   f"it grows")
    return CachePlan(policy, cache_bytes, total, reason)
