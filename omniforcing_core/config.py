"""Model configurations: the real LTX-2 19B shape and tiny ones for tests and the demo."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .rope import RopeConfig


@dataclass(frozen=True)
class ConnectorConfig:
    """The text connectors (1-D transformer with learnable registers) that turn Gemma features
    into the video/audio text contexts. In ComfyUI they live inside the diffusion model."""

    num_layers: int = 2
    heads: int = 30
    head_dim: int = 128
    num_registers: int = 128
    theta: float = 10000.0
    max_pos: float = 4096.0
    rope_kind: str = "split"
    rope_precision: str = "float64"

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 48
    video_heads: int = 32
    video_head_dim: int = 128
    audio_heads: int = 32
    audio_head_dim: int = 64
    in_channels: int = 128
    audio_in_channels: int = 128
    caption_channels: int = 3840
    ff_mult: int = 4
    norm_eps: float = 1e-6
    timestep_scale_multiplier: float = 1000.0
    # gate timestep of the cross-modal AdaLN = sigma * this (1 in the released student, 1000 in the base header)
    av_ca_timestep_scale_multiplier: float = 1.0
    rope: RopeConfig = field(default_factory=RopeConfig)
    num_audio_sinks: int = 0
    connectors: ConnectorConfig | None = None  # None: contexts arrive already through the connectors

    @property
    def video_dim(self) -> int:
        return self.video_heads * self.video_head_dim

    @property
    def audio_dim(self) -> int:
        return self.audio_heads * self.audio_head_dim

    @property
    def cross_dim(self) -> int:
        """Inner dim of the A2V/V2A attentions (audio head geometry)."""
        return self.audio_dim

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        rope = RopeConfig(**{k: (tuple(v) if k == "max_pos" else v) for k, v in d.pop("rope", {}).items()})
        conn = d.pop("connectors", None)
        conn = ConnectorConfig(**conn) if conn else None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(rope=rope, connectors=conn, **{k: v for k, v in d.items() if k in known})


LTX2_19B = ModelConfig()
LTX2_19B_WITH_CONNECTORS = LTX2_19B.replace(connectors=ConnectorConfig())

# Tiny configs keep every structural rule (heads, cross geometry, rope layouts) at toy width.
TINY = ModelConfig(num_layers=2, video_heads=2, video_head_dim=16, audio_heads=2, audio_head_dim=8,
                   caption_channels=24)
TINY_WITH_CONNECTORS = TINY.replace(connectors=ConnectorConfig(num_layers=1, heads=2, head_dim=12,
                                                               num_registers=8))
SMALL = ModelConfig(num_layers=4, video_heads=4, video_head_dim=32, audio_heads=4, audio_head_dim=16,
                    caption_channels=64)

# Big enough that matrix work dominates a CPU forward (the benchmark's default).
BENCH = ModelConfig(num_layers=4, video_heads=8, video_head_dim=64, audio_heads=8, audio_head_dim=32,
                    caption_channels=128)

CONFIGS = {
    "ltx2-19b": LTX2_19B,
    "ltx2-19b+connectors": LTX2_19B_WITH_CONNECTORS,
    "tiny": TINY,
    "tiny+connectors": TINY_WITH_CONNECTORS,
    "small": SMALL,
    "bench": BENCH,
}


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown config '{name}'; known: {', '.join(CONFIGS)}") from None
