"""Text connectors: turn aggregated Gemma features into the video / audio text contexts.

Each connector is a small pre-norm 1-D transformer over the token axis. Valid prompt tokens go
first; the remaining positions up to max(1024, length) are filled with learnable registers (the
register table tiled along the sequence, indexed by absolute position), so the output length is
fixed and every position is valid. RoPE runs over the token index (fraction = index / 4096).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .config import ConnectorConfig
from .layers import Attention, FeedForward, _param, rms, sdpa_attention
from .rope import RopeConfig, apply_rope, table_from_fractions

MIN_LENGTH = 1024  # contexts are padded with registers to at least this many tokens


class ConnectorBlock(nn.Module):
    def __init__(self, cfg: ConnectorConfig, ops, dtype=None, device=None):
        super().__init__()
        self.attn1 = Attention(cfg.dim, cfg.dim, cfg.heads, cfg.head_dim, ops, dtype=dtype, device=device)
        self.ff = FeedForward(cfg.dim, 4, ops, dtype, device)

    def forward(self, x, rope):
        h = rms(x)
        q = self.attn1.query(h, rope)
        k, v = self.attn1.key_value(h)
        x = x + self.attn1.output(q, apply_rope(k, rope), v, None, sdpa_attention)
        return x + self.ff(rms(x))


class TextConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, ops, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg
        self.transformer_1d_blocks = nn.ModuleList(ConnectorBlock(cfg, ops, dtype, device)
                                                   for _ in range(cfg.num_layers))
        self.learnable_registers = _param((cfg.num_registers, cfg.dim), dtype, device, 1.0)

    def _with_registers(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, n, d = x.shape
        total = max(MIN_LENGTH, n)
        reps = -(-total // self.cfg.num_registers)
        regs = self.learnable_registers.to(x).repeat(reps, 1)[:total]  # register of absolute position p
        out = regs.unsqueeze(0).repeat(b, 1, 1)
        if mask is None:
            out[:, :n] = x
            return out
        keep = mask.bool()
        for i in range(b):  # valid tokens to the front (prompts arrive left-padded)
            valid = x[i][keep[i]]
            out[i, : valid.shape[0]] = valid
        return out

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, L, D] (D = heads*head_dim), mask [B, L] (1 = real token) -> [B, max(1024, L), D]."""
        h = self._with_registers(x, mask)
        c = self.cfg
        pos = torch.arange(h.shape[1], dtype=torch.float64)[:, None] / c.max_pos
        rope = table_from_fractions(pos, c.dim, c.heads, RopeConfig(c.rope_kind, c.rope_precision, c.theta))
        rope = rope.to(h.device)
        for blk in self.transformer_1d_blocks:
            h = blk(h, rope)
        return rms(h)
