"""Text connectors: a small 1-D transformer with learnable registers (placeholder, see below)."""
from __future__ import annotations

import torch
from torch import nn

from .config import ConnectorConfig


class TextConnector(nn.Module):
    def __init__(self, cfg: ConnectorConfig, ops, dtype=None, device=None):
        super().__init__()
        self.cfg = cfg

    def forward(self, x, mask=None):
        raise NotImplementedError
