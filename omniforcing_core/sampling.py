"""Block-causal few-step sampling: streaming, offline, and the masked full-sequence reference.

Per block (the official loop): fresh noise; for each sigma predict x0 = x_t - sigma * v (float32)
and re-noise to the next sigma with fresh noise; the last prediction is the block; then the clean
block (re-noised to the context sigma, 0 by default) is run once more so every cache of that block
holds K/V of clean context. Three backends share this loop:
  * `CachedBackend`  - one block against the KV cache (inference; rolling window optional);
  * `PrefixBackend`  - re-runs the whole prefix with block-causal masks every call (the paper's
                       v1 approach and the slow reference the other paths are tested against).
`stream` yields each finished block; `generate` collects the stream.
"""
from __future__ import annotations

import time as _time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from .cache import CachePolicy, StreamCache
from .layout import Block, BlockLayout, Clip
from .model import OmniForcingTransformer
from .noise import CONTEXT_STEP, block_noise
from .schedule import Schedule, make_schedule
from .text import TextKV


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance with separate scales (off unless a negative prompt is given)."""

    negative: TextKV
    video_scale: float = 3.0
    audio_scale: float = 5.0


@dataclass(frozen=True)
class PromptSegment:
    start_s: float
    text: TextKV
    label: str = ""


@dataclass
class PromptSchedule:
    """Prompts switched at block boundaries: a block uses the last segment starting at or before it.
    `recache` re-encodes the cached window under the new prompt (LongLive-style) at a switch."""

    segments: list[PromptSegment]
    recache: bool = False

    def __post_init__(self):
        if not self.segments:
            raise ValueError("a prompt schedule needs at least one prompt")
        self.segments = sorted(self.segments, key=lambda s: s.start_s)
        if self.segments[0].start_s > 0:
            raise ValueError(f"the first prompt starts at {self.segments[0].start_s}s; one must start at 0s")

    def index_at(self, t: float) -> int:
        i = 0
        for j, s in enumerate(self.segments):
            if s.start_s <= t + 1e-9:
                i = j
        return i

    @classmethod
    def single(cls, text: TextKV) -> "PromptSchedule":
        return cls([PromptSegment(0.0, text)])


@dataclass
class BlockResult:
    block: Block
    video: torch.Tensor  # [B, 128, f, h, w] clean latents of this block
    audio: torch.Tensor  # [B, 8, t, 16]
    prompt_index: int
    step_ms: list[float] = field(default_factory=list)
    refresh_ms: float = 0.0
    total_ms: float = 0.0

    @property
    def t_start(self) -> float:
        return self.block.t_start

    @property
    def t_end(self) -> float:
        return self.block.t_end


@dataclass
class StreamSpec:
    """What to generate. `num_blocks=None` streams until the consumer stops."""

    layout: BlockLayout
    height: int
    width: int
    num_blocks: Optional[int]
    seed: int = 0
    batch: int = 1

    @classmethod
    def from_clip(cls, clip: Clip, seed: int = 0, batch: int = 1) -> "StreamSpec":
        return cls(clip.layout, clip.height, clip.width, clip.num_blocks, seed, batch)

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.time.latent_grid(self.height, self.width)

    def video_block_shape(self, b: Block) -> tuple[int, ...]:
        h, w = self.grid
        return (self.batch, self.layout.time.latent_channels, b.video_len, h, w)

    def audio_block_shape(self, b: Block) -> tuple[int, ...]:
        t = self.layout.time
        return (self.batch, t.audio_channels, b.audio_len, t.audio_mel_bins)


# -- backends ---------------------------------------------------------------------------------------

class CachedBackend:
    """Inference: the current block against the KV cache."""

    def __init__(self, model: OmniForcingTransformer, spec: StreamSpec, policy: CachePolicy, batch: int):
        self.model = model
        self.cache: StreamCache = model.new_cache(spec.layout, spec.grid, policy, batch)
        if spec.num_blocks is not None and policy.window is None:
            self.cache.reserve(spec.num_blocks)
        self.grid = spec.grid
        self.ropes = None

    def begin(self, block: Block) -> None:
        self.ropes = self.model.prepare_block(self.cache, block, self.grid)

    def velocity(self, xv, xa, sv, sa, text: TextKV):
        return self.model.forward_block(xv, xa, sv, sa, text, self.cache, self.ropes)

    def commit(self, block: Block, ctx_v, ctx_a, ctx_sv, ctx_sa, text: TextKV) -> None:
        self.model.forward_block(ctx_v, ctx_a, ctx_sv, ctx_sa, text, self.cache, self.ropes)

    def recache(self, history: dict[int, tuple], text: TextKV) -> None:
        """Re-encode every cached block (oldest first) under a new prompt."""
        for j in self.cache.cached_blocks():
            block, cv, ca, sv, sa = history[j]
            self.begin(block)
            self.commit(block, cv, ca, sv, sa, text)

    def nbytes(self) -> int:
        return self.cache.nbytes()


class PrefixBackend:
    """Reference: the whole prefix (clean history at the context sigma + the current block) under
    the block-causal masks, every call. O(n^2) over a stream; no cache."""

    def __init__(self, model: OmniForcingTransformer, spec: StreamSpec, window: Optional[int] = None):
        self.model, self.layout, self.window = model, spec.layout, window
        self.hist_v, self.hist_a = None, None  # context latents of finished blocks
        self.hist_sv, self.hist_sa = None, None  # their per-frame sigmas

    def begin(self, block: Block) -> None:
        pass

    def _cat(self, a, b, dim):
        return b if a is None else torch.cat([a, b], dim)

    def velocity(self, xv, xa, sv, sa, text: TextKV):
        f, t = xv.shape[2], xa.shape[2]
        v = self._cat(self.hist_v, xv.to(self.model.dtype), 2)
        a = self._cat(self.hist_a, xa.to(self.model.dtype), 2)
        svv = self._cat(self.hist_sv, _per_frame(sv, xv.shape[0], f), 1)
        saa = self._cat(self.hist_sa, _per_frame(sa, xa.shape[0], t), 1)
        ov, oa = self.model(v, a, svv, saa, text, self.layout, self.window)
        return ov[:, :, -f:], oa[:, :, -t:]

    def commit(self, block: Block, ctx_v, ctx_a, ctx_sv, ctx_sa, text: TextKV) -> None:
        self.hist_v = self._cat(self.hist_v, ctx_v.to(self.model.dtype), 2)
        self.hist_a = self._cat(self.hist_a, ctx_a.to(self.model.dtype), 2)
        self.hist_sv = self._cat(self.hist_sv, _per_frame(ctx_sv, ctx_v.shape[0], ctx_v.shape[2]), 1)
        self.hist_sa = self._cat(self.hist_sa, _per_frame(ctx_sa, ctx_a.shape[0], ctx_a.shape[2]), 1)

    def recache(self, history, text) -> None:
        pass  # the prefix is re-encoded under the current prompt at every call anyway

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hist_v, self.hist_a) if t is not None)


def _per_frame(sigma, b: int, n: int) -> torch.Tensor:
    s = torch.as_tensor(sigma, dtype=torch.float32)
    if s.dim() == 0:
        s = s.expand(b)
    if s.dim() == 1:
        s = s[:, None].expand(b, n)
    return s.float()


# -- the loop ----------------------------------------------------------------------------------------

class Sampler:
    """Runs the per-block loop over a backend. One instance per stream (it holds the stream state)."""

    def __init__(self, model: OmniForcingTransformer, spec: StreamSpec, prompts: PromptSchedule | TextKV, *,
                 schedule: Optional[Schedule] = None, policy: CachePolicy = CachePolicy(),
                 guidance: Optional[Guidance] = None, first_frame: Optional[torch.Tensor] = None,
                 backend: str = "cached", should_stop: Optional[Callable[[], bool]] = None,
                 on_step: Optional[Callable[[Block, int, int], None]] = None, exit_step: Optional[int] = None):
        """`exit_step` (training, Self-Forcing): each block stops after that step and its x0 there is
        the block; earlier steps run without gradient, the exit step in the caller's grad mode, and
        the cache refresh without gradient on the detached block."""
        model.check_layout(spec.layout)
        self.model, self.spec = model, spec
        self.prompts = prompts if isinstance(prompts, PromptSchedule) else PromptSchedule.single(prompts)
        self.schedule = schedule or make_schedule()
        self.guidance = guidance
        self.first_frame = first_frame
        if first_frame is not None:
            exp = spec.video_block_shape(spec.layout.block(0))
            if tuple(first_frame.shape[:2]) != exp[:2] or tuple(first_frame.shape[3:]) != exp[3:] or \
                    first_frame.shape[2] != 1:
                raise ValueError(f"first_frame must be one latent frame of shape {(exp[0], exp[1], 1, *exp[3:])}, "
                                 f"got {tuple(first_frame.shape)} (encode the image at {spec.width}x{spec.height})")
        mult = 2 if guidance else 1
        if backend == "cached":
            self.backend = CachedBackend(model, spec, policy, spec.batch * mult)
        elif backend == "prefix":
            if policy.rebase_rope:
                raise ValueError("the prefix (reference) backend uses absolute positions; rebase_rope needs 'cached'")
            self.backend = PrefixBackend(model, spec, policy.window)
        else:
            raise ValueError(f"backend '{backend}' unknown; use 'cached' or 'prefix'")
        self.policy = policy
        if exit_step is not None and not 0 <= exit_step < self.schedule.steps:
            raise ValueError(f"exit_step={exit_step} must lie in 0..{self.schedule.steps - 1}")
        self.exit_step = exit_step
        self.should_stop = should_stop
        self.on_step = on_step  # (block, finished step index, steps per block) for progress bars
        self._text_cache: dict[int, TextKV] = {}
        self._history: dict[int, tuple] = {}  # clean context of blocks still in the cache (for re-caching)
        self._prompt_index = 0
        # latents, noise and x0 live in at least float32 (fp64 models stay fp64 for exactness tests)
        self.work_dtype = torch.promote_types(model.dtype, torch.float32)

    # text (with the negative stacked for CFG) per prompt segment, built once
    def _text(self, i: int) -> TextKV:
        if i not in self._text_cache:
            t = self.prompts.segments[i].text
            self._text_cache[i] = t.cat(self.guidance.negative) if self.guidance else t
        return self._text_cache[i]

    def _dup(self, x):
        return torch.cat([x, x]) if self.guidance else x

    def _x0(self, x, vel, sigma):
        """x0 = x_t - sigma * v in float32; CFG combines conditional and unconditional x0."""
        dt = self.work_dtype
        return x.to(dt) - _bcast(sigma, x).to(dt) * vel.to(dt)

    def _guide(self, x0, scale):
        if not self.guidance:
            return x0
        c, u = x0.chunk(2)
        return u + scale * (c - u)

    def run_block(self, block: Block) -> BlockResult:
        spec, sched, dev = self.spec, self.schedule, self.model.device
        t0 = _time.perf_counter()
        pi = self.prompts.index_at(block.t_start) if block.index else 0
        text = self._text(pi)
        if pi != self._prompt_index:
            self._prompt_index = pi
            if self.prompts.recache:
                self.backend.recache(self._history, text)
        self.backend.begin(block)
        seed, wd = spec.seed, self.work_dtype
        vshape, ashape = spec.video_block_shape(block), spec.audio_block_shape(block)
        xv = block_noise(seed, block.index, "video", 0, vshape, dev, wd)
        xa = block_noise(seed, block.index, "audio", 0, ashape, dev, wd)
        fixed = self.first_frame if block.index == 0 else None
        sv_clean = torch.ones(spec.batch, block.video_len, device=dev)
        if fixed is not None:
            sv_clean[:, 0] = 0.0  # the given first latent is held clean at sigma 0
            fixed = fixed.to(dev, self.work_dtype)
        step_ms = []
        x0v = x0a = None
        grad_mode = torch.is_grad_enabled()
        for i, s in enumerate(sched.sigmas):
            if self.exit_step is not None and i > self.exit_step:
                break
            ts = _time.perf_counter()
            if fixed is not None:
                xv = torch.cat([fixed, xv[:, :, 1:]], 2)
            sv = sv_clean * s
            with torch.set_grad_enabled(grad_mode and (self.exit_step is None or i == self.exit_step)):
                vv, va = self.backend.velocity(self._dup(xv), self._dup(xa), self._dup(sv),
                                               torch.full((xa.shape[0] * (2 if self.guidance else 1),), s,
                                                          device=dev), text)
            x0v = self._guide(self._x0(self._dup(xv), vv, self._dup(sv)), self.guidance.video_scale if self.guidance else 1)
            x0a = self._guide(self._x0(self._dup(xa), va, s), self.guidance.audio_scale if self.guidance else 1)
            if fixed is not None:
                x0v = torch.cat([fixed, x0v[:, :, 1:]], 2)
            nxt = 0.0 if i == self.exit_step else sched.next_sigma(i)
            if nxt > 0:
                xv = (1 - nxt) * x0v + nxt * block_noise(seed, block.index, "video", i + 1, vshape, dev, wd)
                xa = (1 - nxt) * x0a + nxt * block_noise(seed, block.index, "audio", i + 1, ashape, dev, wd)
            step_ms.append((_time.perf_counter() - ts) * 1000)
            if self.on_step is not None:
                self.on_step(block, i, sched.steps)
            if self.should_stop is not None and self.should_stop():
                raise InterruptedError(f"stopped during block {block.index}")
        tr = _time.perf_counter()
        cs = sched.context_sigma
        cv, ca = x0v.detach(), x0a.detach()
        if cs > 0:
            cv = (1 - cs) * x0v + cs * block_noise(seed, block.index, "video", CONTEXT_STEP, vshape, dev, wd)
            ca = (1 - cs) * x0a + cs * block_noise(seed, block.index, "audio", CONTEXT_STEP, ashape, dev, wd)
        csv = sv_clean * cs
        csa = torch.full((ca.shape[0],), cs, device=dev)
        ctx = (block, self._dup(cv), self._dup(ca), self._dup(csv), self._dup(csa))
        with torch.set_grad_enabled(grad_mode and self.exit_step is None):
            self.backend.commit(*ctx, text)
        if self.prompts.recache and isinstance(self.backend, CachedBackend):
            self._history[block.index] = ctx
            keep = set(self.backend.cache.cached_blocks())
            self._history = {k: v for k, v in self._history.items() if k in keep}
        now = _time.perf_counter()
        return BlockResult(block, x0v, x0a, pi, step_ms, (now - tr) * 1000, (now - t0) * 1000)

    def __iter__(self) -> Iterator[BlockResult]:
        for block in self.spec.layout.iter_blocks(self.spec.num_blocks):
            yield self.run_block(block)

    def cache_bytes(self) -> int:
        return self.backend.nbytes()


def _bcast(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma scalar / [B] / [B, F] -> broadcastable to x [B, C, F, ...]."""
    s = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
    if s.dim() == 0:
        return s
    if s.dim() == 1:
        return s.view(-1, *([1] * (x.dim() - 1)))
    return s.view(s.shape[0], 1, s.shape[1], *([1] * (x.dim() - 3)))


@torch.no_grad()
def stream(model: OmniForcingTransformer, spec: StreamSpec, prompts, **kw) -> Iterator[BlockResult]:
    """Yield each finished block the moment it is done."""
    yield from Sampler(model, spec, prompts, **kw)


@torch.no_grad()
def generate(model: OmniForcingTransformer, spec: StreamSpec, prompts, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline: the stream collected into whole latents (native layout)."""
    if spec.num_blocks is None:
        raise ValueError("generate needs a finite num_blocks; use stream() for an open-ended stream")
    blocks = list(stream(model, spec, prompts, **kw))
    return torch.cat([b.video for b in blocks], 2), torch.cat([b.audio for b in blocks], 2)


@torch.no_grad()
def generate_reference(model: OmniForcingTransformer, spec: StreamSpec, prompts, **kw):
    """The masked full-sequence reference (slow): same loop, whole prefix re-run every call."""
    return generate(model, spec, prompts, backend="prefix", **kw)


def split_blocks(video: torch.Tensor, audio: torch.Tensor, layout: BlockLayout,
                 num_blocks: int) -> Sequence[tuple[Block, torch.Tensor, torch.Tensor]]:
    return [(b, video[:, :, b.video_start:b.video_end], audio[:, :, b.audio_start:b.audio_end])
            for b in layout.iter_blocks(num_blocks)]
