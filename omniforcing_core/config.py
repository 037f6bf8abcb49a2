"""Model configurations (the real LTX-2 19B shape and tiny ones for tests and the demo) and the
conventions the same weights can be run under.

Shapes come from tensors; conventions do not. The same LTX-2 weights are run three slightly different
ways by the three references this package matches, so every such choice is a named field of one frozen
`Conventions` object, with named presets:

  * ``omniforcing-student``: the released causal checkpoint as `ltx-causal` (OmniForcing, arXiv
    2603.11647) runs it: interleaved RoPE, float32 grid, causal fix, middle of bounds, cross-modal gates
    from each modality's own per-frame sigma, gate multiplier 1, q/k-norm eps 1e-6;
  * ``ltx-core``: Lightricks' ltx-core with the LTX-2 19B header: split RoPE, float64 grid (rounded to
    float32), causal fix, middle of bounds, gates from the other modality's per-sample sigma, x1000;
  * ``comfyui``: ComfyUI 783545f6 `LTXAVModel` with no header values (its constructor defaults):
    interleaved, float32, no causal fix, start of bounds, gates from the maximum sigma of the other
    modality, the video re-normalised after the audio->video update before video->audio, q/k eps 1e-5.
    (A ComfyUI model built from a header takes the header's RoPE and position values; the loader
    node reads them off the native model.)
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from .rope import ARITHMETICS, KINDS, POSITIONS, PRECISIONS, RopeConfig

GATE_TIMESTEPS = ("own", "other-sample", "other-max")
V2A_NORMS = ("before-a2v", "after-a2v")


@dataclass(frozen=True)
class Conventions:
    """Every choice that the weights do not determine, each a named value. See `CONVENTION_FIELDS`."""

    rope_kind: str = "interleaved"
    rope_precision: str = "float32"
    rope_arithmetic: str = "omniforcing"
    causal_fix: bool = True
    positions: str = "middle"
    gate_timestep: str = "own"
    v2a_norm: str = "before-a2v"
    qk_norm_eps: float = 1e-6
    av_ca_timestep_scale_multiplier: float = 1.0

    def __post_init__(self):
        for name, (choices, _) in CONVENTION_FIELDS.items():
            v = getattr(self, name)
            if choices is not None and v not in choices:
                raise ValueError(f"convention {name}={v!r} unknown; use one of {', '.join(map(str, choices))}")
        for name in ("qk_norm_eps", "av_ca_timestep_scale_multiplier"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"convention {name}={v!r} must be a positive number")
            object.__setattr__(self, name, float(v))

    def replace(self, **kw) -> "Conventions":
        return dataclasses.replace(self, **kw)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def preset(self) -> Optional[str]:
        """The name of the preset these equal, or None (a custom mix)."""
        return next((n for n, p in PRESETS.items() if p == self), None)

    def differences(self, other: "Conventions") -> dict:
        """{field: (mine, other's)} for every field that differs."""
        return {k: (v, getattr(other, k)) for k, v in self.as_dict().items() if getattr(other, k) != v}


# field -> (allowed values or None for numbers, what it means)
CONVENTION_FIELDS: dict[str, tuple[Optional[tuple], str]] = {
    "rope_kind": (KINDS, "RoPE memory layout: one angle per adjacent pair over the inner dim (interleaved) or "
                         "per head, first half against second half (split)"),
    "rope_precision": (PRECISIONS, "frequency grid: float32 torch.linspace, or numpy float64 rounded to float32"),
    "rope_arithmetic": (ARITHMETICS, "float32 op order from latent bounds to fractional positions "
                                     "(ltx-causal / ltx-core / ComfyUI)"),
    "causal_fix": ((True, False), "video latent 0 holds one pixel frame (bounds [0, 1)) instead of 8"),
    "positions": (POSITIONS, "self-attention positions at the middle of each latent's bounds or at their start "
                             "(cross-modal positions are the middle in every reference)"),
    "gate_timestep": (GATE_TIMESTEPS, "sigma seen by the A2V/V2A gate AdaLN: each modality's own per-frame sigma "
                                      "(ltx-causal), the other modality's per-sample sigma (ltx-core), or the "
                                      "maximum sigma of the other modality over the batch (ComfyUI)"),
    "v2a_norm": (V2A_NORMS, "video states V2A attends to: normalised before the A2V update (parallel; ltx-causal, "
                            "ltx-core) or after it (ComfyUI 783545f6)"),
    "qk_norm_eps": (None, "epsilon of the q/k RMSNorms of every attention, text connectors included"),
    "av_ca_timestep_scale_multiplier": (None, "gate multiplier: the A2V/V2A gate AdaLN sees sigma * this "
                                              "(1: the student; 1000: the LTX-2 header)"),
}

PRESETS: dict[str, Conventions] = {
    "omniforcing-student": Conventions(),
    "ltx-core": Conventions(rope_kind="split", rope_precision="float64", rope_arithmetic="ltx-core",
                            causal_fix=True, positions="middle", gate_timestep="other-sample",
                            v2a_norm="before-a2v", qk_norm_eps=1e-6, av_ca_timestep_scale_multiplier=1000.0),
    "comfyui": Conventions(rope_kind="interleaved", rope_precision="float32", rope_arithmetic="comfyui",
                           causal_fix=False, positions="start", gate_timestep="other-max", v2a_norm="after-a2v",
                           qk_norm_eps=1e-5, av_ca_timestep_scale_multiplier=1.0),
}
DEFAULT_PRESET = "omniforcing-student"


def get_preset(name: str) -> Conventions:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown conventions preset '{name}'; known: {', '.join(PRESETS)}") from None


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
    norm_eps: float = 1e-6  # the parameter-free pre-norms and the output LayerNorm (1e-6 everywhere)
    timestep_scale_multiplier: float = 1000.0
    # gate timestep of the cross-modal AdaLN = sigma * this (1 in the released student, 1000 in the base header)
    av_ca_timestep_scale_multiplier: float = 1.0
    rope: RopeConfig = field(default_factory=RopeConfig)
    num_audio_sinks: int = 0
    connectors: ConnectorConfig | None = None  # None: contexts arrive already through the connectors
    gate_timestep: str = "own"  # see Conventions
    v2a_norm: str = "before-a2v"
    qk_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.gate_timestep not in GATE_TIMESTEPS:
            raise ValueError(f"gate_timestep '{self.gate_timestep}' unknown; use one of {', '.join(GATE_TIMESTEPS)}")
        if self.v2a_norm not in V2A_NORMS:
            raise ValueError(f"v2a_norm '{self.v2a_norm}' unknown; use one of {', '.join(V2A_NORMS)}")

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

    @property
    def conventions(self) -> Conventions:
        """The complete set of conventions this config runs under (one frozen object)."""
        r = self.rope
        return Conventions(r.kind, r.precision, r.arithmetic, r.causal_fix, r.positions, self.gate_timestep,
                           self.v2a_norm, self.qk_norm_eps, self.av_ca_timestep_scale_multiplier)

    def with_conventions(self, conv: Conventions | str) -> "ModelConfig":
        """This config run under other conventions (a Conventions object or a preset name)."""
        c = get_preset(conv) if isinstance(conv, str) else conv
        rope = dataclasses.replace(self.rope, kind=c.rope_kind, precision=c.rope_precision,
                                   arithmetic=c.rope_arithmetic, causal_fix=c.causal_fix, positions=c.positions)
        return self.replace(rope=rope, gate_timestep=c.gate_timestep, v2a_norm=c.v2a_norm,
                            qk_norm_eps=c.qk_norm_eps, av_ca_timestep_scale_multiplier=c.av_ca_timestep_scale_multiplier)

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

# Architectures recognised by their full key/shape signature when a file has no header: name -> config
# (head counts and connector geometry are then known, not guessed).
KNOWN_ARCHITECTURES = {"LTX-2 19B": LTX2_19B_WITH_CONNECTORS}


def get_config(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown config '{name}'; known: {', '.join(CONFIGS)}") from None
