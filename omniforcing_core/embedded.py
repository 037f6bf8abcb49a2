"""A tiny model with deterministic random weights and pseudo text features: the demo's fallback and the
tests' model, on a fresh machine with no downloads. (The trained toy default is `toy.default`.)"""
from __future__ import annotations

import hashlib

import torch

from .config import ModelConfig, get_config
from .model import OmniForcingTransformer
from .text import TextKV


def random_model(config: ModelConfig | str = "tiny", seed: int = 0, dtype=torch.float32, device="cpu",
                 operations=None) -> OmniForcingTransformer:
    cfg = get_config(config) if isinstance(config, str) else config
    torch.manual_seed(seed)
    m = OmniForcingTransformer(cfg, operations=operations, dtype=dtype, device=device)
    return m.eval().requires_grad_(False)


def toy_text_features(prompt: str, width: int, length: int = 16, batch: int = 1, dtype=torch.float32) -> torch.Tensor:
    """Deterministic pseudo-features of a prompt (stands in for Gemma when no encoder is present)."""
    seed = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little") & ((1 << 63) - 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, width, generator=g).to(dtype)


def toy_text(model: OmniForcingTransformer, prompt: str, batch: int = 1) -> TextKV:
    f = toy_text_features(prompt, model.config.caption_channels, batch=batch)
    if model.config.connectors is not None:
        v, a = model.encode_text(f)
        return model.text_kv(v, a)
    return model.text_kv(f, f)


__all__ = ["random_model", "toy_text_features", "toy_text"]
