"""Noise as a pure function of (seed, block, modality, step): every sampler path draws the same
noise for the same block, on any device, whatever ran before.

The numbers come from a counter-based generator (splitmix64 over element indices, Box-Muller in
float64) built from plain integer and float ops, so they are made on the device that uses them -
no host draw, no host-to-device copy in the block loop - and are the same on a CPU and a GPU.
"""
from __future__ import annotations

import hashlib
import math

import torch

CONTEXT_STEP = -1  # the cache-refresh pass's re-noise


def _mix(*parts: int | str) -> int:
    h = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 torch holds it (two's complement)."""
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _M1, _M2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (products wrap modulo 2^64, as on every device)."""
    z = z + _GOLDEN
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _unit(z: torch.Tensor) -> torch.Tensor:
    """The top 53 bits of a hash as a float64 in (0, 1)."""
    return (_shr(z, 11).to(torch.float64) + 0.5) * (2.0 ** -53)


def _splitmix64_int(z: int) -> int:
    """The same finaliser on a Python int (the key is hashed once on the host, no tensor needed)."""
    m = (1 << 64) - 1
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def normal(key: int, n: int, device) -> torch.Tensor:
    """n standard normals (float64) for a 63-bit key, made on `device`."""
    k = _signed(_splitmix64_int(key))
    i = torch.arange((n + 1) // 2, dtype=torch.int64, device=device) * 2  # two counters per pair
    u1, u2 = _unit(splitmix64(i ^ k)), _unit(splitmix64((i + 1) ^ k))
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = (2.0 * math.pi) * u2
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1).flatten()[:n]


def block_noise(seed: int, block: int, modality: str, step: int, shape, device="cpu",
                dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise for a batch; sample i uses seed + i (so batch items are independent runs)."""
    b, n = shape[0], math.prod(shape[1:])
    rows = [normal(_mix(seed + i, block, modality, step), n, device) for i in range(b)]
    return torch.stack(rows).view(tuple(shape)).to(torch.float32).to(dtype)
