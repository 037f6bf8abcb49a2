"""Noise as a pure function of (seed, block, modality, step): every sampler path draws the same
noise for the same block, on any device, whatever ran before."""
from __future__ import annotations

import hashlib

import torch

CONTEXT_STEP = -1  # the cache-refresh pass's re-noise


def _mix(*parts: int | str) -> int:
    h = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def block_noise(seed: int, block: int, modality: str, step: int, shape, device="cpu",
                dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise for a batch; sample i uses seed + i (so batch items are independent runs)."""
    b = shape[0]
    out = torch.empty(shape, dtype=torch.float32)
    for i in range(b):
        g = torch.Generator().manual_seed(_mix(seed + i, block, modality, step))
        out[i] = torch.randn(shape[1:], generator=g, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)
