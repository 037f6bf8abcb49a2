"""Default layer namespace for the model: torch layers that cast stored weights at compute time.

The model builds its layers through an injectable `operations` namespace with `Linear` and
`RMSNorm` (ComfyUI passes `comfy.ops.*` here). The default stores weights in any dtype
(fp8 included) and casts them to the activation dtype inside forward, so fp8 checkpoints run
without a second full-precision copy.

`quantize_fp8_` turns a model's Linear layers into `Fp8Linear`: float8 (e4m3) weights with a per-tensor
scale, activations quantized per tensor on the fly, one fp8 GEMM (`torch._scaled_mm`) with the output in
the compute dtype - fp8 compute, not only fp8 storage (what `bench --dtype fp8` runs).
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

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


class Fp8Linear(Linear):
    """A Linear with float8 e4m3 weights (`weight` = W / weight_scale) computed by one fp8 GEMM:
    y = (x / s_x)_fp8 @ W_fp8^T * (s_x * s_w) + b, s_x = amax|x| / 448 taken per call on the device (no
    host sync). Falls back to the cast path where torch has no fp8 GEMM for the device."""

    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != FP8 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return super().forward(x)
        x2 = x.reshape(-1, x.shape[-1])
        sx = (x2.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
        xq = (x2 / sx.to(x2.dtype)).to(FP8)
        try:
            y = torch._scaled_mm(xq, w.t(), scale_a=sx, scale_b=self.weight_scale, out_dtype=x.dtype)
        except RuntimeError:  # no fp8 GEMM here: dequantize
            return F.linear(x, (w.to(x.dtype) * self.weight_scale.to(x.dtype)), _cast(self.bias, x))
        if self.bias is not None:
            y = y + _cast(self.bias, y)
        return y.view(*x.shape[:-1], y.shape[-1])


@torch.no_grad()
def quantize_fp8_(model: nn.Module) -> nn.Module:
    """Every `Linear` of the model to `Fp8Linear` in place: e4m3 weights scaled per tensor (amax -> 448),
    biases kept in their dtype. Halves the weight bytes of bf16 and runs the GEMMs in fp8."""
    for m in model.modules():
        if isinstance(m, Linear) and not isinstance(m, Fp8Linear) and m.weight.dtype != FP8:
            scale = (m.weight.abs().amax().float() / FP8_MAX).clamp(min=1e-12)
            q = (m.weight.float() / scale).to(FP8)
            m.weight = nn.Parameter(q, requires_grad=False)
            m.register_buffer("weight_scale", scale.to(q.device))
            m.__class__ = Fp8Linear
    return model
