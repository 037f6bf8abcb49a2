"""Few-step sigma schedules: requested timesteps snapped to LTX-2's shifted 40-step grid."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

RELEASED_STEPS = (1000, 909, 725, 421, 0)  # the released student's 4 steps (+ terminal 0)


def ltx2_sigma_grid(steps: int = 40, tokens: int = 4096, base_shift: float = 0.95, max_shift: float = 2.05,
                    terminal: float = 0.1) -> list[float]:
    """LTX-2's scheduler: linear sigmas, resolution-dependent exponential shift (0.95 @1024 tokens
    to 2.05 @4096), then stretched so the last non-zero sigma equals `terminal`."""
    mm = (max_shift - base_shift) / (4096 - 1024)
    shift = tokens * mm + (base_shift - mm * 1024)
    lin = [1.0 - i / steps for i in range(steps + 1)]
    e = math.exp(shift)
    sig = [e / (e + (1.0 / s - 1.0)) if s > 0 else 0.0 for s in lin]
    last = 1.0 - [s for s in sig if s > 0][-1]
    scale = last / (1.0 - terminal)
    out = [1.0 - (1.0 - s) / scale if s > 0 else 0.0 for s in sig]
    return [float(torch.tensor(s, dtype=torch.float32)) for s in out]


@dataclass(frozen=True)
class Schedule:
    """Sigmas at which the model is called for every block; the prediction at the last is the block."""

    sigmas: tuple[float, ...]
    context_sigma: float = 0.0  # noise level of the cache-refresh pass (context noise / 1000)

    def next_sigma(self, i: int) -> float:
        return self.sigmas[i + 1] if i + 1 < len(self.sigmas) else 0.0

    @property
    def steps(self) -> int:
        return len(self.sigmas)


def _bf16(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).float())


def parse_steps(text: str) -> list[int]:
    try:
        return [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise ValueError(f"steps '{text}': give comma-separated timesteps such as 1000,909,725,421,0") from None


def make_schedule(steps: Sequence[int] = RELEASED_STEPS, *, round_bf16: bool = False, context_noise: int = 0,
                  grid_steps: int = 40) -> Schedule:
    """Validate requested timesteps (0..1000, strictly decreasing, optional terminal 0) and snap each
    t/1000 to the nearest sigma of the 40-step grid."""
    steps = list(steps)
    if not steps or steps == [0]:
        raise ValueError("steps: give at least one timestep above 0, e.g. 1000,909,725,421,0")
    if any(not (0 <= t <= 1000) for t in steps):
        raise ValueError(f"steps {steps}: every timestep must lie in 0..1000")
    if any(b >= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"steps {steps}: timesteps must be strictly decreasing, e.g. 1000,750,500,0")
    if not 0 <= context_noise < 1000:
        raise ValueError(f"context_noise={context_noise} must lie in 0..999")
    if steps[-1] == 0:
        steps = steps[:-1]
    grid = ltx2_sigma_grid(grid_steps)
    snapped = [min(grid, key=lambda g: abs(g - t / 1000.0)) for t in steps]
    for i in range(1, len(snapped)):
        if snapped[i] == snapped[i - 1]:
            raise ValueError(f"steps {steps[i - 1]} and {steps[i]} snap to the same sigma {snapped[i]:.4f} on the "
                             f"{grid_steps}-step grid; space them further apart")
    if 0.0 in snapped:
        raise ValueError(f"steps {steps}: a timestep snaps to sigma 0; put 0 only at the end")
    ctx = context_noise / 1000.0
    if round_bf16:
        snapped, ctx = [_bf16(s) for s in snapped], _bf16(ctx)
    return Schedule(tuple(snapped), ctx)
