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
