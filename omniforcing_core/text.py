"""Per-prompt text state: every layer's text cross-attention K/V, computed once per prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class TextKV:
    video: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v) of attn2
    audio: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v) of audio_attn2
    mask: Optional[torch.Tensor] = None  # additive [B, 1, 1, L] or None when every token is valid

    @property
    def batch(self) -> int:
        return self.video[0][0].shape[0]

    def cat(self, other: "TextKV") -> "TextKV":
        """Stack two prompts along the batch (used by CFG: conditional then unconditional)."""
        if (self.mask is None) != (other.mask is None):
            raise ValueError("cannot batch a masked and an unmasked text context")
        j = lambda a, b: [(torch.cat([x[0], y[0]]), torch.cat([x[1], y[1]])) for x, y in zip(a, b)]  # noqa: E731
        mask = None if self.mask is None else torch.cat([self.mask, other.mask])
        return TextKV(j(self.video, other.video), j(self.audio, other.audio), mask)
