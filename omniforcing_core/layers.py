"""Building blocks of the LTX-2 dual-stream transformer, with LTX-2 parameter names.

Every layer that owns weights is built through `ops` (an injectable namespace with `Linear` and
`RMSNorm`), so ComfyUI can pass `comfy.ops` for offloading and fp8 casting.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .rope import RopeTable, apply_rope

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int, Optional[torch.Tensor]], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, Nq, H*d] x [B, Nk, H*d] -> [B, Nq, H*d]. mask: bool (True = attend) or additive."""
    b, nq, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.dim() == 1:  # one flag per key (a re-cache): broadcast over the rest
        mask = mask.view(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, nq, inner)


class KVChunks:
    """Keys and values held in several chunks (a keep-all cache past its first chunk): attention reads
    them chunk by chunk and merges the partial results by their log-sum-exp, so no chunk is copied."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor],
                 masks: Optional[list[Optional[torch.Tensor]]] = None):
        self.keys, self.values = keys, values
        self.masks = masks  # per chunk: bool per key, or None (every key visible)

    @property
    def length(self) -> int:
        return sum(k.shape[1] for k in self.keys)


def _additive(mask: Optional[torch.Tensor], dtype) -> Optional[torch.Tensor]:
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]):
    """Softmax attention over [B, H, N, d] heads with its log-sum-exp: (out [B, H, Nq, d], lse [B, H, Nq]
    in at least float32). The fused kernel where torch exposes the log-sum-exp (CPU flash attention;
    CUDA flash for half precision without a mask), else the definition."""
    work = torch.promote_types(q.dtype, torch.float32)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=_additive(mask, q.dtype))
        return out, lse.to(work)
    if q.device.type == "cuda" and mask is None and q.dtype in (torch.float16, torch.bfloat16):
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
            return res[0], res[1].to(work)
        except RuntimeError:
            pass
    s = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s + _additive(mask, work)
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]), v.to(work)).to(q.dtype), lse


def chunked_attention(q: torch.Tensor, kv: KVChunks, heads: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, Nq, H*d] against keys in chunks -> [B, Nq, H*d]: attention per chunk, merged exactly by
    out = sum_i exp(lse_i - lse) out_i with lse = log sum_i exp(lse_i). Masks: the chunks' own, else
    `mask` (bool over all keys) or None; every chunk must have a visible key."""
    b, nq, inner = q.shape
    d = inner // heads
    work = torch.promote_types(q.dtype, torch.float32)
    qh = q.view(b, nq, heads, d).transpose(1, 2)
    outs, lses, start = [], [], 0
    for i, (kc, vc) in enumerate(zip(kv.keys, kv.values)):
        n = kc.shape[1]
        if kv.masks is not None:
            m = kv.masks[i]
        else:
            m = None if mask is None else mask[..., start:start + n]
        if m is not None and m.dim() == 1:  # one flag per key
            m = m.view(1, 1, 1, n)
        start += n
        o, lse = attention_lse(qh, kc.view(b, n, heads, d).transpose(1, 2), vc.view(b, n, heads, d).transpose(1, 2), m)
        outs.append(o)
        lses.append(lse)
    lse = torch.logsumexp(torch.stack(lses), 0)
    out = sum(torch.exp(li - lse)[..., None] * oi.to(work) for oi, li in zip(outs, lses))
    return out.to(q.dtype).transpose(1, 2).reshape(b, nq, inner)


def rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMSNorm (LTX-2's pre-norm)."""
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale1: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """AdaLN: x * (1 + scale) + shift in one op, given scale1 = 1 + scale. x [B, F*t, D]; shift/scale1 per
    frame [B, F, D] (AdaLN values are per frame, not per token) or per sample [B, 1, D]."""
    if shift.shape[1] == 1:
        return torch.addcmul(shift, x, scale1)
    b, n, d = x.shape
    xf = x.view(b, n // tokens_per_frame, tokens_per_frame, d)
    return torch.addcmul(shift[:, :, None], xf, scale1[:, :, None]).view(b, n, d)


def gated_add(x: torch.Tensor, out: torch.Tensor, gate: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """The gated residual x + gate * out in one op; gate per frame [B, F, D] or per sample [B, 1, D]."""
    if gate.shape[1] == 1:
        return torch.addcmul(x, out, gate)
    b, n, d = x.shape
    t = tokens_per_frame
    return torch.addcmul(x.view(b, n // t, t, d), out.view(b, n // t, t, d), gate[:, :, None]).view(b, n, d)


_GELU_K = 2.0 * math.sqrt(2.0 / math.pi)  # tanh(z) = 2 sigmoid(2z) - 1


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). One op
    (`F.gelu(approximate="tanh")`) except for float32/float64 on CPU, where torch's tanh is slow and the
    same function as x * sigmoid(x (k + 0.044715 k x^2)), k = 2 sqrt(2/pi), is twice as fast (equal to
    float rounding; bench.py measures it). Training (a graph to differentiate) keeps the one op."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or (
            x.requires_grad and torch.is_grad_enabled()):
        return F.gelu(x, approximate="tanh")
    z = torch.mul(x, x).mul_(0.044715 * _GELU_K).add_(_GELU_K).mul_(x)
    return z.sigmoid_().mul_(x)


def timestep_sinusoid(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cos half first (flip_sin_to_cos), no frequency shift, float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def _param(shape, dtype, device, std: float) -> nn.Parameter:
    p = torch.empty(shape, dtype=dtype, device=device)
    if p.device.type != "meta":
        with torch.no_grad():
            p.normal_(0.0, std)
    return nn.Parameter(p)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, ops, dtype=None, device=None, in_dim: int = 256):
        super().__init__()
        self.linear_1 = ops.Linear(in_dim, dim, dtype=dtype, device=device)
        self.linear_2 = ops.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class _Emb(nn.Module):
    def __init__(self, dim, ops, dtype=None, device=None):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim, ops, dtype, device)


class AdaLayerNormSingle(nn.Module):
    """sigma -> sinusoid -> MLP = embedded timestep e; linear(silu(e)) = n*dim modulation values."""

    def __init__(self, dim: int, n: int, ops, dtype=None, device=None):
        super().__init__()
        self.n, self.dim = n, dim
        self.emb = _Emb(dim, ops, dtype, device)
        self.linear = ops.Linear(dim, n * dim, dtype=dtype, device=device)

    def forward(self, t_scaled: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """t_scaled [...]: returns ([..., n, dim], [..., dim])."""
        shape = t_scaled.shape
        e = self.emb.timestep_embedder(timestep_sinusoid(t_scaled.reshape(-1)).to(dtype))
        vals = self.linear(F.silu(e))
        return vals.view(*shape, self.n, self.dim), e.view(*shape, self.dim)


class TextProjection(nn.Module):
    """Caption projection: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, in_dim: int, dim: int, ops, dtype=None, device=None):
        super().__init__()
        self.linear_1 = ops.Linear(in_dim, dim, dtype=dtype, device=device)
        self.linear_2 = ops.Linear(dim, dim, dtype=dtype, device=device)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


def _plain_linear(m: nn.Module) -> bool:
    """A Linear whose forward is F.linear on its own weight (ours or torch's; not ComfyUI's casting and
    patching layers, not fp8): its GEMM may be replaced by a fused one."""
    from .ops import Linear
    return type(m) in (nn.Linear, Linear)


def linear_gelu_tanh(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(proj(x)). On CPU in float32 (inference) one oneDNN matmul with the GELU-tanh in its
    epilogue (bias + GELU applied as the tiles are written: no extra pass over the 4x-wide hidden state);
    elsewhere the layer then `gelu_tanh`."""
    w, b = proj.weight, proj.bias
    if (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and w.device == x.device
            and (b is None or b.dtype == torch.float32) and _plain_linear(proj)
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
            and not torch.compiler.is_compiling() and torch.backends.mkldnn.is_available()):
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "tanh")
    return gelu_tanh(proj(x))


class _GeluProj(nn.Module):
    def __init__(self, dim, inner, ops, dtype=None, device=None):
        super().__init__()
        self.proj = ops.Linear(dim, inner, dtype=dtype, device=device)

    def forward(self, x):
        return linear_gelu_tanh(self.proj, x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int, ops, dtype=None, device=None):
        super().__init__()
        self.net = nn.ModuleList([_GeluProj(dim, dim * mult, ops, dtype, device), nn.Identity(),
                                  ops.Linear(dim * mult, dim, dtype=dtype, device=device)])

    def forward(self, x):
        for m in self.net:
            x = m(x)
        return x


class Attention(nn.Module):
    """LTX-2 attention: q/k RMSNorm over the whole inner dim (across heads), RoPE before the split."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, ops, eps=1e-6,
                 dtype=None, device=None):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = ops.Linear(query_dim, inner, dtype=dtype, device=device)
        self.to_k = ops.Linear(context_dim, inner, dtype=dtype, device=device)
        self.to_v = ops.Linear(context_dim, inner, dtype=dtype, device=device)
        self.q_norm = ops.RMSNorm(inner, eps=eps, dtype=dtype, device=device)
        self.k_norm = ops.RMSNorm(inner, eps=eps, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([ops.Linear(inner, query_dim, dtype=dtype, device=device), nn.Identity()])

    def query(self, x: torch.Tensor, rope: Optional[RopeTable]) -> torch.Tensor:
        return apply_rope(self.q_norm(self.to_q(x)), rope)

    def key_value(self, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-rotated keys and values (the caller or the cache applies RoPE)."""
        return self.k_norm(self.to_k(ctx)), self.to_v(ctx)

    def output(self, q, k, v, mask, attn_fn: AttentionFn) -> torch.Tensor:
        if isinstance(k, KVChunks):  # keys in several chunks: merged by log-sum-exp (any attn_fn is bypassed)
            return self.to_out[0](chunked_attention(q, k, self.heads, mask))
        return self.to_out[0](attn_fn(q, k, v, self.heads, mask))
