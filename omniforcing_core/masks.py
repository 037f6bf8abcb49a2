"""The four block-causal attention masks of the full-sequence (reference/training) path.

True = may attend. A query in block k sees every key of blocks 0..k of either modality:
bidirectional inside a block (video<->audio too), causal across blocks. Sink tokens sit at the
front of the audio stream and belong to block 0, so everything sees them. The KV-cache path uses
no mask: causality comes from what is in the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from .layout import BlockLayout


@dataclass(frozen=True)
class Masks:
    video_self: torch.Tensor  # [Nv, Nv]
    audio_self: torch.Tensor  # [Na, Na] (Na includes sinks)
    a2v: torch.Tensor  # [Nv, Na]  video queries -> audio keys
    v2a: torch.Tensor  # [Na, Nv]  audio queries -> video keys

    def get(self, kind: str) -> torch.Tensor:
        return getattr(self, kind)


def video_token_blocks(layout: BlockLayout, f_v: int, tokens_per_latent: int) -> torch.Tensor:
    per_latent = torch.tensor([layout.video_block_of(f) for f in range(f_v)])
    return per_latent.repeat_interleave(tokens_per_latent)


def audio_token_blocks(layout: BlockLayout, f_a: int) -> torch.Tensor:
    real = torch.tensor([layout.audio_block_of(a) for a in range(f_a)])
    return torch.cat([torch.zeros(layout.num_sinks, dtype=real.dtype), real])


def build_masks(layout: BlockLayout, f_v: int, f_a: int, tokens_per_latent: int, device="cpu",
                window: Optional[int] = None) -> Masks:
    """`window`: also hide blocks older than `window` blocks before the query's, except block 0
    (the sink) - the full-sequence twin of the rolling KV cache."""
    bv = video_token_blocks(layout, f_v, tokens_per_latent).to(device)
    ba = audio_token_blocks(layout, f_a).to(device)

    def see(q, k):
        m = k[None, :] <= q[:, None]
        if window is not None:
            m &= (k[None, :] == 0) | (k[None, :] >= q[:, None] - window)
        return m

    return Masks(see(bv, bv), see(ba, ba), see(bv, ba), see(ba, bv))


@lru_cache(maxsize=8)
def cached_masks(layout: BlockLayout, f_v: int, f_a: int, tokens_per_latent: int, device: str,
                 window: Optional[int] = None) -> Masks:
    """Masks are pure functions of the shape; build once per shape instead of every forward."""
    return build_masks(layout, f_v, f_a, tokens_per_latent, device, window)
