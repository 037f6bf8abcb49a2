"""A tiny caption encoder (stands in for Gemma + connectors at toy scale), trained with the teacher.

Word-level tokens over the world's closed vocabulary, fixed length (pad tokens are ordinary
tokens, so every position is valid and no text mask is needed), learned positions, one pre-norm
transformer layer, output [B, L, caption_channels] = what `model.text_kv(ctx, ctx)` expects.
The empty caption "" is the unconditional prompt (classifier-free guidance / caption dropout).
"""
from __future__ import annotations

import torch
from torch import nn

from .world import vocabulary

PAD, UNK = "<pad>", "<unk>"


class TextEncoder(nn.Module):
    def __init__(self, dim: int = 32, length: int = 20, heads: int = 2, layers: int = 1):
        super().__init__()
        self.words = [PAD, UNK] + vocabulary()
        self.index = {w: i for i, w in enumerate(self.words)}
        self.length = length
        self.tok = nn.Embedding(len(self.words), dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        out = torch.zeros(len(captions), self.length, dtype=torch.long)
        for i, c in enumerate(captions):
            ws = c.lower().replace(",", " , ").split()[: self.length]
            out[i, : len(ws)] = torch.tensor([self.index.get(w, 1) for w in ws], dtype=torch.long) if ws else 0
        return out

    def forward(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenize(captions).to(self.pos.device)
        x = self.tok(ids) + self.pos
        return self.norm(self.blocks(x))


__all__ = ["TextEncoder"]
