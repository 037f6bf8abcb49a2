"""Default layer namespace for the model: torch layers that cast stored weights at compute time.

The model builds its layers through an injectable `operations` namespace with `Linear` and
`RMSNorm` (ComfyUI passes `comfy.ops.*` here). The default stores weights in any dtype
(fp8 included) and casts them to the activation dtype inside forward, so fp8 checkpoints run
without a second full-precision copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cast(t, like: torch.Tensor):
    if t is None or t.dtype == like.dtype and t.device == like.device:
        return t
    return t.to(device=like.device, dtype=like.dtype)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))


class RMSNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, _cast(self.weight, x), self.eps)


class CastOps:
    Linear = Linear
    RMSNorm = RMSNorm


default_ops = CastOps
