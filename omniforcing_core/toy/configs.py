"""Stage configurations of the toy recipe.

A `StageConfig` is plain data (JSON round trip; unknown keys in older files are ignored);
`configs/*.json` hold the shipped ones, `toy_config(stage)` the measured defaults.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import ModelConfig

CONFIG_DIR = Path(__file__).parent / "configs"

# the toy transformer: every structural rule of LTX-2 (dual stream, cross geometry) at width 128/64, 4 layers
# (issue 12: the 3-layer 64/32 one learned captions but not synchrony, its teacher included)
TOY_MODEL = ModelConfig(num_layers=4, video_heads=4, video_head_dim=32, audio_heads=4, audio_head_dim=16,
                        caption_channels=32)
TOY_SIZE = 128  # pixels (4 x 4 latent grid)
TOY_SECONDS = 2  # v2 layout: 7 video latents (49 frames), 51 audio latents


@dataclass
class StageConfig:
    stage: str  # teacher | ode | causal | dmd
    model: str = "toy"  # "toy" (TOY_MODEL) or a core config name (`config.get_config`)
    init: Optional[str] = None  # run dir (or ckpt file) whose model initialises this stage
    teacher: Optional[str] = None  # run dir of the teacher (ode, dmd)
    data: Optional[str] = None  # dataset dir (teacher: latents; causal: ODE pairs)
    layout: str = "v2"
    num_sinks: int = 0
    sink_positions: str = "identity"
    seconds: int = TOY_SECONDS
    size: int = TOY_SIZE
    steps: int = 1000
    batch: int = 8
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup: int = 0
    cooldown: int = 0  # the last `cooldown` steps of the run take the learning rate linearly down to 0
    seed: int = 0
    log_every: int = 25
    save_every: int = 200
    caption_dropout: float = 0.1  # teacher: unconditional training for CFG
    sigma_shift: float = 1.0  # teacher: log-shift of the logit-normal sigma draw
    # teacher: share of samples whose video and audio sigmas are drawn independently, and share where one
    # modality (either, at random) is given clean (sigma 0, no loss on it) - conditional training, which
    # teaches the cross-modal attention what A->V / V->A and synchrony need. ode: share of trajectories
    # sampled with one modality (the clip's own latents) given, which Stage II then keeps clean.
    independent_sigmas: float = 0.0
    given_share: float = 0.0
    ode_steps: tuple[int, ...] = (1000, 909, 725, 421, 0)
    teacher_steps: int = 40  # Euler steps on LTX-2's shifted grid (ODE pairs)
    cfg_video: float = 3.0
    cfg_audio: float = 5.0
    cfg_av: float = 0.0  # teacher sampling (ODE pairs, DMD): modality guidance, see stages.guided_x0
    num_pairs: int = 512  # ode: trajectories to generate
    audio_sigma_mapping: str = "block"  # causal: "block" (correct) | "proportional" (official bug, ref 8.2)
    audio_loss_weight: float = 1.0
    critic_lr: float = 2e-5
    critic_betas: tuple[float, float] = (0.0, 0.999)
    gen_every: int = 5  # dmd: generator update every n critic updates
    t_min: int = 20
    t_max: int = 980
    context_noise: int = 0
    ema_decay: float = 0.0
    ema_start: int = 200
    fsdp: bool = False  # under torchrun: FSDP-wrap trainable models (else DDP)
    mixed_precision: Optional[str] = None  # "bf16" on GPUs

    def model_config(self) -> ModelConfig:
        from ..config import get_config
        base = TOY_MODEL if self.model == "toy" else get_config(self.model)
        if self.num_sinks or self.sink_positions != "identity":
            base = base.replace(num_audio_sinks=self.num_sinks,
                                rope=dataclasses.replace(base.rope, sink_positions=self.sink_positions))
        return base

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "StageConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: (tuple(v) if isinstance(v, list) and k in ("betas", "critic_betas", "ode_steps") else v)
             for k, v in d.items() if k in known}
        return cls(**d)

    @classmethod
    def load(cls, path) -> "StageConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))


def toy_config(stage: str, **kw) -> StageConfig:
    """The toy recipe's defaults per stage (what the measured runs used, minus paths)."""
    base = {
        "teacher": dict(lr=1e-3, steps=11000, batch=8, betas=(0.9, 0.99), warmup=200, independent_sigmas=0.3,
                        given_share=0.6),  # the last phase; scripts/train_toy.sh ramps given_share up to it
        "ode": dict(num_pairs=384, batch=32, given_share=0.5, cfg_av=2.0),
        "causal": dict(lr=3e-4, steps=1500, batch=8, betas=(0.9, 0.999)),
        "dmd": dict(lr=2e-5, critic_lr=2e-5, steps=1200, batch=4, betas=(0.0, 0.999), weight_decay=0.01,
                    gen_every=5, ema_decay=0.99, ema_start=50, cfg_av=2.0),
    }
    base["bidmd"] = dict(base["dmd"])  # Stage I: Stage III's optimisation, bidirectional rollout
    if stage not in base:
        raise ValueError(f"unknown stage '{stage}'; use teacher, bidmd, ode, causal or dmd")
    d = dict(base[stage])
    d.update(kw)
    return StageConfig(stage=stage, **d)


def load_named(name: str) -> StageConfig:
    p = CONFIG_DIR / (name if name.endswith(".json") else name + ".json")
    if not p.exists():
        known = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.json")))
        raise FileNotFoundError(f"no stage config '{name}'; shipped: {known}")
    return StageConfig.load(p)


__all__ = ["StageConfig", "TOY_MODEL", "TOY_SIZE", "TOY_SECONDS", "toy_config", "load_named", "CONFIG_DIR"]
