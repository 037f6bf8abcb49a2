"""Rotary position embeddings over physical positions (seconds and pixels).

LTX-2 places each latent at the middle of its [start, end) bounds (the causal fix clamps latent 0),
divides by max positions (20 s, 2048 px) and rotates by omega_i * (2 * frac - 1) with omega
log-spaced from pi/2 to theta*pi/2. Two memory layouts exist in the wild:
  * interleaved: one angle per adjacent pair over the whole inner dim (the released student);
  * split: per head, the first half of the head is rotated against the second half (the base header).
Padding dims (inner dim not divisible by 2*axes) get the identity rotation and come first.
Sink tokens get the identity rotation everywhere (position-free), or, as an ablation
(`sink_positions="incremental"`), ordinary positions just before t = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .layout import TimeBase


@dataclass(frozen=True)
class RopeConfig:
    kind: str = "interleaved"  # "interleaved" | "split"
    precision: str = "float32"  # frequency grid precision: "float32" | "float64"
    theta: float = 10000.0
    max_pos: tuple[float, float, float] = (20.0, 2048.0, 2048.0)  # seconds, px, px
    audio_max_pos: float = 20.0
    # audio sink tokens: "identity" (position-free, the paper) or "incremental" (sink i of S sits at
    # -(S - i) audio latents before t = 0; the Table 3 ablation)
    sink_positions: str = "identity"

    def __post_init__(self):
        if self.sink_positions not in ("identity", "incremental"):
            raise ValueError(f"sink_positions '{self.sink_positions}' unknown; use 'identity' or 'incremental'")
        if self.kind not in ("interleaved", "split"):
            raise ValueError(f"rope kind '{self.kind}' unknown; use 'interleaved' or 'split'")
        if self.precision not in ("float32", "float64"):
            raise ValueError(f"rope precision '{self.precision}' unknown; use 'float32' or 'float64'")

    @property
    def grid_dtype(self) -> torch.dtype:
        return torch.float64 if self.precision == "float64" else torch.float32


@dataclass
class RopeTable:
    """cos/sin for a run of tokens. interleaved: [T, D]; split: [T, H, D/(2H)]."""

    cos: torch.Tensor
    sin: torch.Tensor
    kind: str

    def to(self, device=None, dtype=None) -> "RopeTable":
        return RopeTable(self.cos.to(device=device, dtype=dtype), self.sin.to(device=device, dtype=dtype), self.kind)

    @property
    def length(self) -> int:
        return self.cos.shape[0]

    def slice(self, start: int, end: int) -> "RopeTable":
        return RopeTable(self.cos[start:end], self.sin[start:end], self.kind)


def cat_tables(tables: Sequence[RopeTable]) -> RopeTable:
    return RopeTable(torch.cat([t.cos for t in tables]), torch.cat([t.sin for t in tables]), tables[0].kind)


def frequencies(n_axes: int, dim: int, cfg: RopeConfig) -> torch.Tensor:
    """omega_i = (pi/2) * theta^(i/(n-1)), n = dim // (2 * n_axes), in the grid precision."""
    n = dim // (2 * n_axes)
    dt = cfg.grid_dtype
    if n == 1:
        expo = torch.zeros(1, dtype=dt)
    else:
        expo = torch.arange(n, dtype=dt) / (n - 1)
    return (cfg.theta ** expo) * (math.pi / 2)


def table_from_fractions(frac: torch.Tensor, dim: int, heads: int, cfg: RopeConfig) -> RopeTable:
    """frac: [T, n_axes] fractional positions (position / max_pos). Returns the table for `dim`."""
    t, n_axes = frac.shape
    omega = frequencies(n_axes, dim, cfg)  # [n]
    frac = frac.to(cfg.grid_dtype)
    # angles ordered [omega_0 on every axis, omega_1 on every axis, ...]
    ang = (omega[None, :, None] * (frac[:, None, :] * 2 - 1)).reshape(t, -1)  # [T, n*axes]
    cos, sin = ang.cos(), ang.sin()
    if cfg.kind == "interleaved":
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
        pad = dim - cos.shape[-1]
        cos, sin = _pad_front(cos, sin, pad)
        return RopeTable(cos, sin, "interleaved")
    half = dim // 2
    cos, sin = _pad_front(cos, sin, half - cos.shape[-1])
    if half % heads:
        raise ValueError(f"split rope: {half} frequencies do not divide into {heads} heads")
    return RopeTable(cos.reshape(t, heads, half // heads), sin.reshape(t, heads, half // heads), "split")


def _pad_front(cos: torch.Tensor, sin: torch.Tensor, pad: int):
    if pad <= 0:
        return cos, sin
    t = cos.shape[0]
    return (torch.cat([torch.ones(t, pad, dtype=cos.dtype), cos], -1),
            torch.cat([torch.zeros(t, pad, dtype=sin.dtype), sin], -1))


def identity_table(n: int, dim: int, heads: int, kind: str, dtype=torch.float32) -> RopeTable:
    """cos = 1, sin = 0: position-free tokens (audio sinks)."""
    if kind == "interleaved":
        shape = (n, dim)
    else:
        shape = (n, heads, dim // (2 * heads))
    return RopeTable(torch.ones(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), kind)


# -- physical positions -----------------------------------------------------------------------

def video_latent_times(latents: range, time: TimeBase) -> torch.Tensor:
    return torch.tensor([time.video.latent_time(f) for f in latents], dtype=torch.float64)


def audio_latent_times(latents: range, time: TimeBase) -> torch.Tensor:
    return torch.tensor([time.audio.latent_time(a) for a in latents], dtype=torch.float64)


def video_fractions(latents: range, grid_hw: tuple[int, int], time: TimeBase, cfg: RopeConfig) -> torch.Tensor:
    """[F*H*W, 3] (t, y, x) fractions; token order f-major then h then w (patchify order)."""
    h, w = grid_hw
    s = time.spatial_stride
    t = video_latent_times(latents, time) / cfg.max_pos[0]
    y = (torch.arange(h, dtype=torch.float64) * s + s / 2) / cfg.max_pos[1]
    x = (torch.arange(w, dtype=torch.float64) * s + s / 2) / cfg.max_pos[2]
    tt, yy, xx = torch.meshgrid(t, y, x, indexing="ij")
    return torch.stack([tt, yy, xx], -1).reshape(-1, 3)


def video_self_table(latents: range, grid_hw, time: TimeBase, dim: int, heads: int, cfg: RopeConfig) -> RopeTable:
    return table_from_fractions(video_fractions(latents, grid_hw, time, cfg), dim, heads, cfg)


def sink_times(sinks: int, time: TimeBase) -> torch.Tensor:
    """Times (s) of the "incremental" sink positions: one audio latent apart, ending just before 0."""
    return -torch.arange(sinks, 0, -1, dtype=torch.float64) / time.audio.latent_rate


def _sink_table(sinks: int, time: TimeBase, dim: int, heads: int, cfg: RopeConfig, max_pos: float,
                dtype) -> RopeTable:
    if cfg.sink_positions == "incremental":
        return table_from_fractions((sink_times(sinks, time) / max_pos)[:, None], dim, heads, cfg)
    return identity_table(sinks, dim, heads, cfg.kind, dtype)


def audio_self_table(latents: range, sinks: int, time: TimeBase, dim: int, heads: int, cfg: RopeConfig) -> RopeTable:
    frac = (audio_latent_times(latents, time) / cfg.audio_max_pos)[:, None]
    tab = table_from_fractions(frac, dim, heads, cfg)
    if sinks:
        tab = cat_tables([_sink_table(sinks, time, dim, heads, cfg, cfg.audio_max_pos, tab.cos.dtype), tab])
    return tab


def video_cross_table(latents: range, tokens_per_latent: int, time: TimeBase, dim: int, heads: int,
                      cfg: RopeConfig) -> RopeTable:
    """1-D temporal rope for the video side of A2V/V2A, shared by all tokens of a latent frame."""
    cross_max = max(cfg.max_pos[0], cfg.audio_max_pos)
    frac = (video_latent_times(latents, time) / cross_max)[:, None]
    tab = table_from_fractions(frac, dim, heads, cfg)
    rep = lambda a: a.repeat_interleave(tokens_per_latent, dim=0)  # noqa: E731
    return RopeTable(rep(tab.cos), rep(tab.sin), tab.kind)


def audio_cross_table(latents: range, sinks: int, time: TimeBase, dim: int, heads: int, cfg: RopeConfig) -> RopeTable:
    cross_max = max(cfg.max_pos[0], cfg.audio_max_pos)
    frac = (audio_latent_times(latents, time) / cross_max)[:, None]
    tab = table_from_fractions(frac, dim, heads, cfg)
    if sinks:
        tab = cat_tables([_sink_table(sinks, time, dim, heads, cfg, cross_max, tab.cos.dtype), tab])
    return tab


# -- application ------------------------------------------------------------------------------

def apply_rope(x: torch.Tensor, table: Optional[RopeTable]) -> torch.Tensor:
    """Rotate x [B, T, D] (D = heads * head_dim) by a table of T rows; None is the identity."""
    if table is None:
        return x
    cos, sin = table.cos.to(x.dtype), table.sin.to(x.dtype)
    if table.kind == "interleaved":
        x2 = x.unflatten(-1, (-1, 2))
        rot = torch.stack([-x2[..., 1], x2[..., 0]], -1).flatten(-2)
        return x * cos + rot * sin
    b, t, d = x.shape
    heads = cos.shape[1]
    xs = x.view(b, t, heads, 2, -1)
    a, c = xs[..., 0, :], xs[..., 1, :]
    return torch.stack([a * cos - c * sin, c * cos + a * sin], -2).reshape(b, t, d)
