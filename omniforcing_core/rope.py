"""Rotary position embeddings over physical positions (seconds and pixels), computed the way each
reference computes them, to the bit.

LTX-2 places each latent at the middle (or, in ComfyUI's default, the start) of its [start, end)
bounds, where the causal fix makes video latent 0 hold one pixel frame (audio latents are causal in
every reference), divides by max positions (20 s, 2048 px) and rotates by omega_i * (2 * frac - 1)
with omega log-spaced from pi/2 to theta*pi/2. Everything after the bounds is float32 in all three
references (the released OmniForcing student's `ltx-causal`, Lightricks' `ltx-core`, ComfyUI's
`LTXAVModel`), but each rounds in its own order; `RopeConfig.arithmetic` names the order:

  * "omniforcing" (ltx-causal `causal_precompute_freqs_cis`): midpoint in frames, then / rate, / max_pos;
  * "ltx-core" (ltx-core patchifiers + `precompute_freqs_cis`): each bound / rate, then midpoint, / max_pos;
  * "comfyui" (783545f6 `_prepare_positional_embeddings`): video bounds * (1 / fps), audio bounds / rate,
    then midpoint (or start), / max_pos.

The frequency grid (`precision`) is float32 `theta ** linspace(0, 1, n)` * pi / 2 ("float32"), or the
same in numpy float64 rounded once to float32 ("float64": ltx-core's and ComfyUI's
`generate_freq_grid_np`). Two memory layouts exist in the wild:
  * interleaved: one angle per adjacent pair over the whole inner dim (the released student);
  * split: per head, the first half of the head is rotated against the second half (the base header).
Padding dims (inner dim not divisible by 2*axes) get the identity rotation and come first.
Cross-modal (A2V/V2A) positions are always the middle of the time bounds, in every reference.
Sink tokens get the identity rotation everywhere (position-free), or, as an ablation
(`sink_positions="incremental"`), ordinary positions just before t = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from .layout import CodecTime, TimeBase

KINDS = ("interleaved", "split")
PRECISIONS = ("float32", "float64")
ARITHMETICS = ("omniforcing", "ltx-core", "comfyui")
POSITIONS = ("middle", "start")


@dataclass(frozen=True)
class RopeConfig:
    kind: str = "interleaved"  # "interleaved" | "split"
    precision: str = "float32"  # frequency grid: "float32" (torch linspace) | "float64" (numpy, rounded to f32)
    theta: float = 10000.0
    max_pos: tuple[float, float, float] = (20.0, 2048.0, 2048.0)  # seconds, px, px
    audio_max_pos: float = 20.0
    # audio sink tokens: "identity" (position-free, the paper) or "incremental" (sink i of S sits at
    # -(S - i) audio latents before t = 0; the Table 3 ablation)
    sink_positions: str = "identity"
    arithmetic: str = "omniforcing"  # whose float32 op order turns bounds into fractions (module doc)
    causal_fix: bool = True  # video latent 0 holds one pixel frame (bounds [0, 1)), not 8
    positions: str = "middle"  # self-attention positions: "middle" of the bounds or their "start"

    def __post_init__(self):
        for name, value, allowed in (("sink_positions", self.sink_positions, ("identity", "incremental")),
                                     ("rope kind", self.kind, KINDS), ("rope precision", self.precision, PRECISIONS),
                                     ("rope arithmetic", self.arithmetic, ARITHMETICS),
                                     ("rope positions", self.positions, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{name} '{value}' unknown; use " + " or ".join(f"'{a}'" for a in allowed))
        if not isinstance(self.causal_fix, bool):
            raise ValueError(f"causal_fix must be True or False, got {self.causal_fix!r}")

    @property
    def grid_dtype(self) -> torch.dtype:
        """The dtype tables are stored in: float64 for the float64 grid, else float32. The values are the
        same either way: angles, cos and sin are float32 in every reference, whatever the grid precision."""
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

    def prepare(self, dtype: torch.dtype) -> "PreparedRope":
        """The table in the form `apply_rope` uses at compute dtype `dtype`, made once per block rather
        than at every attention call (see `PreparedRope`)."""
        return PreparedRope.of(self, dtype)


_COMPLEX = {torch.float32: torch.complex64, torch.float64: torch.complex128}


@dataclass
class PreparedRope:
    """A `RopeTable` cast to the compute dtype once, in the forms that rotate with the fewest passes:
      * cos and a signed sin (the sign of the rotation folded in): x * cos + swap(x) * signed_sin;
      * interleaved, float32/float64, also one complex factor per pair, so that eagerly the rotation is
        one complex multiply (x0 + i x1)(cos + i sin) = (x0 cos - x1 sin) + i (x1 cos + x0 sin) - the
        definition (under torch.compile the real form is used: it fuses with its neighbours)."""

    kind: str
    cos: torch.Tensor
    signed_sin: torch.Tensor
    factor: Optional[torch.Tensor] = None  # complex [T, D/2] (interleaved, float32/float64)

    @staticmethod
    def of(table: RopeTable, dtype: torch.dtype) -> "PreparedRope":
        cos, sin = table.cos, table.sin
        factor = None
        if table.kind == "interleaved" and dtype in _COMPLEX:
            factor = torch.complex(cos[..., 0::2].to(dtype), sin[..., 0::2].to(dtype)).to(_COMPLEX[dtype])
        if table.kind == "interleaved":  # pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)
            signed = torch.stack([-sin[..., 0::2], sin[..., 1::2]], -1).flatten(-2)
        else:  # per head halves (a, c) -> (a cos - c sin, c cos + a sin)
            signed = torch.cat([-sin, sin], -1)
            cos = torch.cat([cos, cos], -1)
        return PreparedRope(table.kind, cos.to(dtype), signed.to(dtype), factor)

    def tensors(self) -> list:
        return [t for t in (self.cos, self.signed_sin, self.factor) if t is not None]

    def with_tensors(self, it) -> "PreparedRope":
        """The same table with its tensors taken in order from `it` (static copies for a CUDA graph)."""
        return PreparedRope(self.kind, *(None if t is None else next(it) for t in (self.cos, self.signed_sin,
                                                                                     self.factor)))

    @property
    def length(self) -> int:
        return self.cos.shape[0]

    def slice(self, start: int, end: int) -> "PreparedRope":
        cut = lambda t: None if t is None else t[start:end]  # noqa: E731
        return PreparedRope(self.kind, cut(self.cos), cut(self.signed_sin), cut(self.factor))


def cat_tables(tables: Sequence[RopeTable]) -> RopeTable:
    if len(tables) == 1:
        return tables[0]
    return RopeTable(torch.cat([t.cos for t in tables]), torch.cat([t.sin for t in tables]), tables[0].kind)


_FREQS: dict = {}


def frequencies_on(n_axes: int, dim: int, cfg: RopeConfig, device) -> torch.Tensor:
    """`frequencies` computed once on the host (the references' exact float32 grid) and kept on `device`:
    the block loop builds its tables there without a host-to-device copy."""
    key = (n_axes, dim, cfg.theta, cfg.precision, torch.device(device))
    if key not in _FREQS:
        _FREQS[key] = frequencies(n_axes, dim, cfg).to(device)
    return _FREQS[key]


def frequencies(n_axes: int, dim: int, cfg: RopeConfig) -> torch.Tensor:
    """omega_i = (pi/2) * theta^(i/(n-1)), n = dim // (2 * n_axes), as float32, op for op as the references:
    float32: theta ** torch.linspace(0, 1, n, float32), then * pi, then / 2 (all in float32);
    float64: numpy float64 linspace and power, * pi / 2, rounded once to float32."""
    n = dim // (2 * n_axes)
    theta = cfg.theta
    if cfg.precision == "float64":
        grid = np.power(theta, np.linspace(np.log(1) / np.log(theta), np.log(theta) / np.log(theta), n,
                                           dtype=np.float64))
        return torch.tensor(grid * math.pi / 2, dtype=torch.float32)
    grid = theta ** torch.linspace(math.log(1, theta), math.log(theta, theta), n, dtype=torch.float32)
    return grid * math.pi / 2


def table_from_fractions(frac: torch.Tensor, dim: int, heads: int, cfg: RopeConfig) -> RopeTable:
    """frac: [T, n_axes] fractional positions (position / max_pos), rounded to float32 if wider.
    Angles, cos and sin in float32 as every reference computes them. Returns the table for `dim`."""
    t, n_axes = frac.shape
    device = frac.device
    omega = frequencies_on(n_axes, dim, cfg, device)  # [n]
    frac = frac.to(torch.float32)
    # angles ordered [omega_0 on every axis, omega_1 on every axis, ...]
    ang = (omega[None, :, None] * (frac[:, None, :] * 2 - 1)).reshape(t, -1)  # [T, n*axes]
    interleaved = cfg.kind == "interleaved"
    width = dim if interleaved else dim // 2
    if not interleaved and width % heads:
        raise ValueError(f"split rope: {width} frequencies do not divide into {heads} heads")
    pad = width - ang.shape[1] * (2 if interleaved else 1)  # identity dims, first
    out = []
    for fn, fill in ((torch.cos, 1.0), (torch.sin, 0.0)):
        tab = torch.full((t, width), fill, dtype=cfg.grid_dtype, device=device)
        vals = fn(ang)  # float32, as every reference
        if interleaved:  # each angle rotates one adjacent pair
            tab[:, pad:].view(t, -1, 2).copy_(vals[:, :, None].expand(-1, -1, 2))
        else:
            tab[:, pad:].copy_(vals)
        out.append(tab if interleaved else tab.view(t, heads, width // heads))
    return RopeTable(out[0], out[1], cfg.kind)


def identity_table(n: int, dim: int, heads: int, kind: str, dtype=torch.float32, device=None) -> RopeTable:
    """cos = 1, sin = 0: position-free tokens (audio sinks)."""
    if kind == "interleaved":
        shape = (n, dim)
    else:
        shape = (n, heads, dim // (2 * heads))
    return RopeTable(torch.ones(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device), kind)


# -- physical positions -----------------------------------------------------------------------

def latent_bounds(codec: CodecTime, latents: range, causal: bool = True, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[start, end) of each latent in decoded frames (pixel or mel), float32 (exact integers).
    causal: latent 0 holds one frame (LTX-2's causal codecs); else every latent holds `stride`."""
    lat = torch.arange(latents.start, latents.stop, dtype=torch.int64, device=device)
    s = codec.stride
    if causal:
        return ((lat * s + 1 - s).clamp(min=0).to(torch.float32), ((lat + 1) * s + 1 - s).clamp(min=0).to(torch.float32))
    return (lat * s).to(torch.float32), ((lat + 1) * s).to(torch.float32)


def _seconds(frames: torch.Tensor, rate: float, reciprocal: bool) -> torch.Tensor:
    return frames * (1.0 / rate) if reciprocal else frames / rate


def latent_seconds(codec: CodecTime, latents: range, cfg: RopeConfig, *, video: bool, where: str,
                   device=None) -> torch.Tensor:
    """Position (s, float32) of each latent, rounded in the order `cfg.arithmetic` names. where: "middle"
    of the bounds or their "start". Video's first latent follows `cfg.causal_fix`; audio is always causal.
    Every op is an exactly rounded float32 add/multiply/divide, so any device gives the same bits."""
    s, e = latent_bounds(codec, latents, cfg.causal_fix if video else True, device)
    rate = codec.frame_rate
    recip = video and cfg.arithmetic == "comfyui"  # ComfyUI: pixel frame * (1.0 / frame_rate)
    if where == "start":
        return _seconds(s, rate, recip)
    if cfg.arithmetic == "omniforcing":  # ltx-causal: (start + end) / 2.0 / fps (and * hop / sr for audio)
        return _seconds((s + e) / 2.0, rate, recip)
    return (_seconds(s, rate, recip) + _seconds(e, rate, recip)) / 2.0


def _pixel_fractions(n: int, stride: int, max_pos: float, where: str, device=None) -> torch.Tensor:
    px = torch.arange(n, dtype=torch.float32, device=device) * stride
    if where == "middle":
        px = px + stride / 2.0  # (start + end) / 2.0 of integer bounds: exact in every reference's order
    return px / max_pos


def video_fractions(latents: range, grid_hw: tuple[int, int], time: TimeBase, cfg: RopeConfig,
                    device=None) -> torch.Tensor:
    """[F*H*W, 3] (t, y, x) float32 fractions; token order f-major then h then w (patchify order)."""
    h, w = grid_hw
    s = time.spatial_stride
    t = latent_seconds(time.video, latents, cfg, video=True, where=cfg.positions, device=device) / cfg.max_pos[0]
    y = _pixel_fractions(h, s, cfg.max_pos[1], cfg.positions, device)
    x = _pixel_fractions(w, s, cfg.max_pos[2], cfg.positions, device)
    tt, yy, xx = torch.meshgrid(t, y, x, indexing="ij")
    return torch.stack([tt, yy, xx], -1).reshape(-1, 3)


def video_self_table(latents: range, grid_hw, time: TimeBase, dim: int, heads: int, cfg: RopeConfig,
                     device=None) -> RopeTable:
    return table_from_fractions(video_fractions(latents, grid_hw, time, cfg, device), dim, heads, cfg)


def sink_times(sinks: int, time: TimeBase, device=None) -> torch.Tensor:
    """Times (s) of the "incremental" sink positions: one audio latent apart, ending just before 0."""
    return -torch.arange(sinks, 0, -1, dtype=torch.float64, device=device) / time.audio.latent_rate


def _sink_table(sinks: int, time: TimeBase, dim: int, heads: int, cfg: RopeConfig, max_pos: float,
                dtype, device=None) -> RopeTable:
    if cfg.sink_positions == "incremental":
        return table_from_fractions((sink_times(sinks, time, device) / max_pos)[:, None], dim, heads, cfg)
    return identity_table(sinks, dim, heads, cfg.kind, dtype, device)


def audio_self_table(latents: range, sinks: int, time: TimeBase, dim: int, heads: int, cfg: RopeConfig,
                     device=None) -> RopeTable:
    secs = latent_seconds(time.audio, latents, cfg, video=False, where=cfg.positions, device=device)
    tab = table_from_fractions((secs / cfg.audio_max_pos)[:, None], dim, heads, cfg)
    if sinks:
        tab = cat_tables([_sink_table(sinks, time, dim, heads, cfg, cfg.audio_max_pos, tab.cos.dtype, device), tab])
    return tab


def video_cross_table(latents: range, tokens_per_latent: int, time: TimeBase, dim: int, heads: int,
                      cfg: RopeConfig, device=None) -> RopeTable:
    """1-D temporal rope for the video side of A2V/V2A (middle of the bounds), shared by a frame's tokens."""
    cross_max = max(cfg.max_pos[0], cfg.audio_max_pos)
    secs = latent_seconds(time.video, latents, cfg, video=True, where="middle", device=device)
    tab = table_from_fractions((secs / cross_max)[:, None], dim, heads, cfg)
    rep = lambda a: a.repeat_interleave(tokens_per_latent, dim=0)  # noqa: E731
    return RopeTable(rep(tab.cos), rep(tab.sin), tab.kind)


def audio_cross_table(latents: range, sinks: int, time: TimeBase, dim: int, heads: int, cfg: RopeConfig,
                      device=None) -> RopeTable:
    cross_max = max(cfg.max_pos[0], cfg.audio_max_pos)
    secs = latent_seconds(time.audio, latents, cfg, video=False, where="middle", device=device)
    tab = table_from_fractions((secs / cross_max)[:, None], dim, heads, cfg)
    if sinks:
        tab = cat_tables([_sink_table(sinks, time, dim, heads, cfg, cross_max, tab.cos.dtype, device), tab])
    return tab


# -- application ------------------------------------------------------------------------------

def _pairs_viewable(x: torch.Tensor) -> bool:
    """x [B, T, D] can be viewed as complex pairs in place (unit last stride, even other strides/offset)."""
    return x.stride(-1) == 1 and x.stride(0) % 2 == 0 and x.stride(1) % 2 == 0 and x.storage_offset() % 2 == 0


def apply_rope(x: torch.Tensor, table: Optional[RopeTable | PreparedRope]) -> torch.Tensor:
    """Rotate x [B, T, D] (D = heads * head_dim) by a table of T rows; None is the identity. A `RopeTable`
    is prepared for x's dtype on the spot; the block loop passes tables prepared once per block."""
    if table is None:
        return x
    if isinstance(table, RopeTable):
        table = table.prepare(x.dtype)
    b, t, d = x.shape
    if (table.factor is not None and not torch.compiler.is_compiling()  # (compiled: the real form, which fuses)
            and table.factor.dtype == _COMPLEX.get(x.dtype) and _pairs_viewable(x)):
        xc = torch.view_as_complex(x.view(b, t, d // 2, 2))
        return torch.view_as_real(xc * table.factor).view(b, t, d)
    if table.cos.dtype != x.dtype:
        table = PreparedRope(table.kind, table.cos.to(x.dtype), table.signed_sin.to(x.dtype))
    if table.kind == "interleaved":
        swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        return torch.addcmul(x * table.cos, swapped, table.signed_sin)
    heads = table.cos.shape[1]
    xs = x.view(b, t, heads, 2, -1)
    swapped = xs.flip(-2).reshape(b, t, heads, -1)
    return torch.addcmul(x.view(b, t, heads, -1) * table.cos, swapped, table.signed_sin).view(b, t, d)
