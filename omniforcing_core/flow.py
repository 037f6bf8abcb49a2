"""Rectified-flow arithmetic shared by inference and every training stage.

x_t = (1 - sigma) x0 + sigma eps, the model predicts v = eps - x0, so x0 = x_t - sigma v.
Sigmas are a scalar, per sample [B] or per latent frame [B, F]; x0 is computed in at least float32.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .modality import AV


def expand_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma scalar / [B] / [B, F] -> broadcastable to x [B, C, F, ...] (float32)."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.dim() == 0:
        return s
    if s.dim() == 1:
        return s.view(-1, *([1] * (x.dim() - 1)))
    return s.view(s.shape[0], 1, s.shape[1], *([1] * (x.dim() - 3)))


def frame_sigmas(sigma, b: int, n: int, device=None) -> torch.Tensor:
    """sigma scalar / [B] / [B, F] -> per latent frame [B, F] (float32), or an error naming the shape."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if s.dim() == 0:
        s = s.expand(b)
    if s.dim() == 1:
        s = s[:, None].expand(b, n)
    if s.shape != (b, n):
        raise ValueError(f"sigma shape {tuple(s.shape)} does not match [B={b}, frames={n}]")
    return s.float()


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """x0 moved to noise level sigma along the straight path to `noise`."""
    s = sigma if isinstance(sigma, (int, float)) else expand_sigma(sigma, x0).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma, dtype=torch.float32) -> torch.Tensor:
    dtype = torch.promote_types(dtype, x.dtype)
    return x.to(dtype) - expand_sigma(sigma, x).to(dtype) * v.to(dtype)


def euler_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, next_sigma: float) -> torch.Tensor:
    """One deterministic ODE step from sigma to next_sigma (the teacher's sampler)."""
    return x0 if next_sigma == 0 else x + (x - x0) / sigma * (next_sigma - sigma)


def twice(x):
    """The CFG batch: the same input for the conditional and the unconditional half."""
    return torch.cat([x, x]) if isinstance(x, torch.Tensor) and x.dim() else x


def guide(x0: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance over a [conditional; unconditional] batch."""
    c, u = x0.chunk(2)
    return u + scale * (c - u)


Velocity = Callable[[AV, AV], AV]  # (x, sigma) -> v, both AV


def predict_x0(velocity: Velocity, x: AV, sigma: AV, cfg: Optional[AV] = None,
               dtype=torch.float32) -> AV:
    """x0 for both streams from one model call. With `cfg` (scales per stream) the call runs the
    conditional and unconditional halves as one batch (the caller's velocity stacks the texts)."""
    if cfg is not None:
        x, sigma = x.map(twice), sigma.map(twice)
    v = velocity(x, sigma)
    x0 = AV(*(x0_from_velocity(xi, vi, si, dtype) for xi, vi, si in zip(x, v, sigma)))
    return x0 if cfg is None else x0.zip(cfg, guide)


__all__ = ["expand_sigma", "frame_sigmas", "noisy", "x0_from_velocity", "euler_step", "twice", "guide", "predict_x0",
           "Velocity"]
