"""Block-causal few-step sampling: streaming, offline, and the masked full-sequence reference.

`Sampler.run_block` is the whole per-block loop (the official one): fresh noise; at each sigma
predict x0 = x_t - sigma * v and re-noise to the next sigma with fresh noise; the last x0 is the
block; then the clean block is run once more so every cache holds K/V of clean context. Where the
model's attention comes from is a `Backend`:
  * `CachedBackend`  - the block against the KV cache (inference; rolling window optional);
  * `PrefixBackend`  - the whole prefix under the block-causal masks at every call (the paper's v1
                       approach, and the slow reference the cached path is tested against).
`stream` yields each finished block; `generate` collects the stream; `generate_reference` runs it
on the prefix backend.

Conditioned streams (A->V, V->A): with a `Given` modality, each block takes its slice of the user's
clean latents and holds it at sigma 0 through every step (the way the cache refresh sees a finished
block), so only the other modality is denoised; the finished block - given latents and generated
ones - enters the cache as usual.
"""
from __future__ import annotations

import time as _time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Protocol, Union

import torch

from .budget import HEADROOM, check_fits, check_stream, gib
from .cache import CachePolicy, StreamCache
from .flow import frame_sigmas, noisy, predict_x0, twice
from .layout import Block, BlockLayout, Clip
from .modality import AV
from .model import OmniForcingTransformer, Runtime
from .noise import CONTEXT_STEP, block_noise
from .prompts import PromptTimeline
from .schedule import Schedule, make_schedule
from .text import TextKV


class NonFiniteError(ArithmeticError):
    """A block came out NaN/Inf; the stream stops there (files made so far stay valid)."""


class GivenError(ValueError):
    """A given audio or video that cannot drive the stream asked for (too short, wrong shape); the
    message says what was given, what was asked and the fix."""


MODALITIES = ("video", "audio")


@dataclass(frozen=True)
class Given:
    """One modality supplied by the user: A->V gives `audio`, V->A gives `video`.

    `latents`: the whole given stream, clean, in the native layout (video [1 or B, 128, F, h, w],
    audio [1 or B, 8, T, 16]); it may be longer than any training clip. Block k uses latents
    [start, end) of that modality as the layout splits them; latents past the last block are unused."""

    modality: str
    latents: torch.Tensor

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise GivenError(f"given modality '{self.modality}' is not one of {', '.join(MODALITIES)}")
        dims = 5 if self.modality == "video" else 4
        if self.latents.dim() != dims:
            want = "[B, 128, F, H/32, W/32]" if self.modality == "video" else "[B, 8, T, 16]"
            raise GivenError(f"given {self.modality} latents must be {want}, got shape {tuple(self.latents.shape)}; "
                             f"encode the {self.modality} with the model's {self.modality} VAE")

    @property
    def generated(self) -> str:
        """The modality the sampler denoises."""
        return "audio" if self.modality == "video" else "video"

    def num_blocks(self, layout: BlockLayout) -> int:
        """Whole blocks the given latents cover (the block holding latent index `length` is the first
        one not complete)."""
        n = self.latents.shape[2]
        return layout.video_block_of(n) if self.modality == "video" else layout.audio_block_of(n)

    def seconds(self, layout: BlockLayout) -> float:
        n = self.num_blocks(layout)
        return layout.seconds_for_blocks(n) if n else 0.0

    def check(self, clip: Clip) -> None:
        """Shape and length against the clip, or a GivenError naming the fix."""
        block0 = clip.layout.block(0)
        exp = clip.video_shape(block0) if self.modality == "video" else clip.audio_shape(block0)
        got = tuple(self.latents.shape)
        if got[0] not in (1, clip.batch) or got[1] != exp[1] or got[3:] != exp[3:]:
            want = f"[1 or {clip.batch}, {exp[1]}, frames, {', '.join(map(str, exp[3:]))}]"
            size = f" at {clip.width}x{clip.height}" if self.modality == "video" else ""
            raise GivenError(f"given {self.modality} latents have shape {got}, the clip needs {want}; "
                             f"encode the {self.modality}{size} with the model's {self.modality} VAE")
        need = clip.num_blocks or 1
        have = self.num_blocks(clip.layout)
        if have < need:
            n_lat = clip.layout.latents_for_blocks(need)[0 if self.modality == "video" else 1]
            asked = clip.layout.seconds_for_blocks(need)
            fix = (f"ask for at most {self.seconds(clip.layout):g} s" if have else
                   f"give at least {clip.layout.seconds_for_blocks(1):g} s")
            raise GivenError(
                f"the given {self.modality} covers {self.seconds(clip.layout):g} s ({got[2]} latents = {have} whole "
                f"blocks) but {asked:g} s ({need} blocks, {n_lat} latents) were asked: {fix}, or give a longer "
                f"{self.modality}")

    def block(self, block: Block, batch: int, device, dtype) -> torch.Tensor:
        """This block's clean latents, batch-expanded, on the sampler's device and dtype."""
        s, e = (block.video_start, block.video_end) if self.modality == "video" else (block.audio_start,
                                                                                      block.audio_end)
        x = self.latents[:, :, s:e].to(device=device, dtype=dtype)
        return x.expand(batch, *x.shape[1:]) if x.shape[0] != batch else x


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance with separate scales (off unless a negative prompt is given)."""

    negative: TextKV
    video_scale: float = 3.0
    audio_scale: float = 5.0

    @property
    def scale(self) -> AV:
        return AV(self.video_scale, self.audio_scale)


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


# -- backends ---------------------------------------------------------------------------------------

class Backend(Protocol):
    """Where a block's attention context comes from."""

    def begin(self, block: Block) -> None:
        """Start a block (before its denoising calls)."""

    def velocity(self, x: AV, sigma: AV, text: TextKV) -> AV:
        """The model's velocity for the current block's latents."""

    def commit(self, block: Block, x: AV, sigma: AV, text: TextKV) -> None:
        """Make the finished block context for later blocks."""

    def switch_prompt(self, text: TextKV) -> None:
        """A new prompt takes over (optionally re-encode the history under it)."""

    def nbytes(self) -> int:
        """Bytes of attention state held."""


class CachedBackend:
    """Inference: the current block against the KV cache. It keeps the clean context latents of the
    blocks still in its cache, so a prompt switch can re-encode them (LongLive-style re-cache)."""

    def __init__(self, model: OmniForcingTransformer, clip: Clip, policy: CachePolicy = CachePolicy(),
                 batch: Optional[int] = None, runtime: Runtime = Runtime()):
        self.model, self.runtime, self.grid = model, runtime, clip.grid
        batch, dtype = batch or clip.batch, runtime.dtype_of(model)
        check_stream(model, clip, policy, batch, dtype)  # before anything is allocated
        self.cache: StreamCache = model.new_cache(clip.layout, clip.grid, policy, batch, dtype=dtype)
        if clip.num_blocks is not None and policy.window is None:
            self.cache.reserve(clip.num_blocks)
        elif clip.num_blocks is None and policy.window is None:  # open-ended keep-all: check each growth
            self.cache.on_grow = lambda n: check_fits(
                n + HEADROOM, model.device, f"growing the keep-all KV cache by {gib(n)}",
                "stop here, or restart with a rolling window (e.g. window=4) for open-ended streams")
        self.ropes = None
        self.history: dict[int, tuple] = {}  # block index -> (block, x, sigma) of its clean context

    def begin(self, block: Block) -> None:
        self.ropes = self.model.prepare_block(self.cache, block, self.grid)

    def velocity(self, x: AV, sigma: AV, text: TextKV) -> AV:
        return AV(*self.model.forward_block(x.video, x.audio, sigma.video, sigma.audio, text, self.cache,
                                            self.ropes, self.runtime))

    def commit(self, block: Block, x: AV, sigma: AV, text: TextKV) -> None:
        self.velocity(x, sigma, text)  # the forward writes the block's K/V; its output is not needed
        self.history[block.index] = (block, x, sigma)
        keep = set(self.cache.cached_blocks())
        self.history = {k: v for k, v in self.history.items() if k in keep}

    def switch_prompt(self, text: TextKV) -> None:
        for j in self.cache.cached_blocks():  # oldest first, each in its own slot
            block, x, sigma = self.history[j]
            self.begin(block)
            self.commit(block, x, sigma, text)

    def nbytes(self) -> int:
        return self.cache.nbytes()


class PrefixBackend:
    """Reference: the whole prefix (clean history at the context sigma + the current block) under
    the block-causal masks, every call. O(n^2) over a stream; no cache. A prompt switch needs no
    re-cache: the prefix is re-encoded under the current prompt at every call anyway."""

    def __init__(self, model: OmniForcingTransformer, clip: Clip, window: Optional[int] = None,
                 runtime: Runtime = Runtime()):
        self.model, self.layout, self.window, self.runtime = model, clip.layout, window, runtime
        self.hist: Optional[AV] = None  # context latents of finished blocks
        self.hist_sigma: Optional[AV] = None  # their per-frame sigmas

    def begin(self, block: Block) -> None:
        pass

    def _with_history(self, x: AV, sigma: AV) -> tuple[AV, AV]:
        """The finished blocks' context followed by `x` (in the compute dtype), and their per-frame sigmas."""
        x = x.map(lambda t: t.to(self.runtime.dtype_of(self.model)))
        sigma = x.zip(sigma, lambda t, s: frame_sigmas(s, t.shape[0], t.shape[2], t.device))
        if self.hist is None:
            return x, sigma
        cat = lambda a, b: torch.cat([a, b.to(a.dtype)], -1 if a.dim() == 2 else 2)  # noqa: E731
        return self.hist.zip(x, cat), self.hist_sigma.zip(sigma, cat)

    def velocity(self, x: AV, sigma: AV, text: TextKV) -> AV:
        full, full_sigma = self._with_history(x, sigma)
        v = AV(*self.model(full.video, full.audio, full_sigma.video, full_sigma.audio, text, self.layout,
                           self.window, self.runtime))
        return v.zip(x, lambda out, cur: out[:, :, -cur.shape[2]:])

    def commit(self, block: Block, x: AV, sigma: AV, text: TextKV) -> None:
        self.hist, self.hist_sigma = self._with_history(x, sigma)

    def switch_prompt(self, text: TextKV) -> None:
        pass

    def nbytes(self) -> int:
        return 0 if self.hist is None else sum(t.numel() * t.element_size() for t in self.hist)


# -- the loop ----------------------------------------------------------------------------------------

Prompts = Union[PromptTimeline, TextKV]


class Sampler:
    """Runs the per-block loop over a backend. One instance per stream (it holds the stream state).

    `backend`: None runs against a KV cache with `policy`; pass a `PrefixBackend` for the reference.
    `should_stop()` is asked after every step (a host's cancel); `on_step(block, step, steps)` drives
    progress bars. `first_frame` ([B, 128, 1, h, w]) is held clean at sigma 0 (image -> A/V).
    `given` (a `Given`): one modality held clean at sigma 0 in every block (audio -> video, video ->
    audio); an open-ended clip then ends where the given stream does."""

    def __init__(self, model: OmniForcingTransformer, clip: Clip, prompts: Prompts, *,
                 schedule: Optional[Schedule] = None, policy: CachePolicy = CachePolicy(),
                 guidance: Optional[Guidance] = None, first_frame: Optional[torch.Tensor] = None,
                 given: Optional[Given] = None, backend: Optional[Backend] = None, runtime: Runtime = Runtime(),
                 should_stop: Optional[Callable[[], bool]] = None,
                 on_step: Optional[Callable[[Block, int, int], None]] = None):
        model.check_layout(clip.layout)
        self.model, self.clip = model, clip
        self.prompts = prompts if isinstance(prompts, PromptTimeline) else PromptTimeline.single(prompts)
        self.prompts.validate()
        self.schedule = schedule or make_schedule()
        self.guidance = guidance
        if first_frame is not None:
            exp = clip.video_shape(clip.layout.block(0))
            if tuple(first_frame.shape) != (exp[0], exp[1], 1, *exp[3:]):
                raise ValueError(f"first_frame must be one latent frame of shape {(exp[0], exp[1], 1, *exp[3:])}, "
                                 f"got {tuple(first_frame.shape)} (encode the image at {clip.width}x{clip.height})")
        self.first_frame = first_frame
        if given is not None:
            if first_frame is not None and given.modality == "video":
                raise GivenError("a first frame and a given video both fix the video: give one of them")
            given.check(clip)
        self.given = given
        self.backend: Backend = backend or CachedBackend(model, clip, policy, clip.batch * (2 if guidance else 1),
                                                         runtime)
        self.should_stop, self.on_step = should_stop, on_step
        self._texts: dict[int, TextKV] = {}
        self._prompt_index = 0
        self._sigma_tensors: dict[tuple, AV] = {}  # see sigmas()
        # latents, noise and x0 live in at least float32 (fp64 models stay fp64 for exactness tests)
        self.work_dtype = torch.promote_types(runtime.dtype_of(model), torch.float32)

    # -- the pieces of a block (also used by training rollouts) -------------------------------------
    def prompt_for(self, block: Block) -> tuple[int, TextKV]:
        """This block's prompt (negative stacked for CFG); at a switch the backend hears of it."""
        i = self.prompts.index_for(block)
        if i not in self._texts:
            t = self.prompts.prompts[i].value
            self._texts[i] = t.cat(self.guidance.negative) if self.guidance else t
        if i != self._prompt_index:
            self._prompt_index = i
            if self.prompts.recache:
                self.backend.switch_prompt(self._texts[i])
        return i, self._texts[i]

    def noise(self, block: Block, step: int) -> AV:
        c, dev, dt = self.clip, self.model.device, self.work_dtype
        return AV(block_noise(c.seed, block.index, "video", step, c.video_shape(block), dev, dt),
                  block_noise(c.seed, block.index, "audio", step, c.audio_shape(block), dev, dt))

    def sigmas(self, block: Block, sigma: float, doubled: bool = False) -> AV:
        """Per-frame video sigmas (0 for a given first frame) and per-sample audio sigmas; 0 for a given
        modality; `doubled`: the CFG batch's. Made on the device once per stream for each kind of block and
        never changed: the model does its per-sigma work once per distinct sigma tensor."""
        key = (float(sigma), block.video_len, self.first_frame is not None and block.index == 0, doubled)
        if key in self._sigma_tensors:
            return self._sigma_tensors[key]
        b, dev = self.clip.batch, self.model.device
        video = torch.full((b, block.video_len), float(sigma), device=dev)
        if self.first_frame is not None and block.index == 0:
            video[:, 0] = 0.0
        audio = torch.full((b,), float(sigma), device=dev)
        if self.given is not None:
            (video if self.given.modality == "video" else audio).zero_()
        self._sigma_tensors[key] = AV(video, audio).map(twice) if doubled else AV(video, audio)
        return self._sigma_tensors[key]

    def hold_given(self, block: Block, x: AV) -> AV:
        """`x` with the clean latents that are given in place: the first frame, a given modality."""
        if self.first_frame is not None and block.index == 0:
            fixed = self.first_frame.to(x.video.device, x.video.dtype)
            x = AV(torch.cat([fixed, x.video[:, :, 1:]], 2), x.audio)
        if self.given is not None:
            t = getattr(x, self.given.modality)
            clean = self.given.block(block, t.shape[0], t.device, t.dtype)
            x = AV(clean, x.audio) if self.given.modality == "video" else AV(x.video, clean)
        return x

    def predict(self, block: Block, x: AV, sigma: float, text: TextKV) -> AV:
        """x0 of the block at noise level sigma (CFG when guided)."""
        x = self.hold_given(block, x)

        def velocity(xx: AV, ss: AV) -> AV:  # with CFG, the batch's sigmas as made once (equal to ss)
            return self.backend.velocity(xx, self.sigmas(block, sigma, True) if self.guidance else ss, text)
        x0 = predict_x0(velocity, x, self.sigmas(block, sigma), self.guidance.scale if self.guidance else None,
                        self.work_dtype)
        return self.hold_given(block, x0)

    def renoise(self, block: Block, x0: AV, step: int, sigma: float) -> AV:
        return x0.zip(self.noise(block, step), lambda x, n: noisy(x, n, sigma))

    def commit(self, block: Block, x0: AV, text: TextKV) -> None:
        """Refresh the caches with the finished block at the context sigma (0: clean)."""
        cs = self.schedule.context_sigma
        ctx = x0.map(torch.Tensor.detach)
        if cs > 0:
            ctx = self.renoise(block, ctx, CONTEXT_STEP, cs)
        sigma = self.sigmas(block, cs, doubled=self.guidance is not None)
        if self.guidance:
            ctx = ctx.map(twice)  # the CFG batch
        self.backend.commit(block, ctx, sigma, text)

    # -- the block loop --------------------------------------------------------------------------
    def run_block(self, block: Block) -> BlockResult:
        t0 = _time.perf_counter()
        # 1. The prompt of this block (a switch may re-encode the cached history under it).
        prompt_index, text = self.prompt_for(block)
        # 2. Start the block in the backend: cache slot and positions.
        self.backend.begin(block)
        # 3. Few-step denoising: fresh noise, then at each sigma predict x0 and re-noise to the next.
        x = self.noise(block, 0)
        step_ms = []
        for i, sigma in enumerate(self.schedule.sigmas):
            ts = _time.perf_counter()
            x0 = self.predict(block, x, sigma, text)
            nxt = self.schedule.next_sigma(i)
            if nxt > 0:
                x = self.renoise(block, x0, i + 1, nxt)
            step_ms.append((_time.perf_counter() - ts) * 1000)
            if self.on_step is not None:
                self.on_step(block, i, self.schedule.steps)
            if self.should_stop is not None and self.should_stop():
                raise InterruptedError(f"stopped during block {block.index}")
        # 4. A NaN/Inf block would poison every later block through the cache: stop here instead.
        self._check_finite(block, x0)
        # 5. Run the clean block once more so later blocks attend to clean K/V.
        tr = _time.perf_counter()
        self.commit(block, x0, text)
        now = _time.perf_counter()
        return BlockResult(block, x0.video, x0.audio, prompt_index, step_ms, (now - tr) * 1000, (now - t0) * 1000)

    def _check_finite(self, block: Block, x0: AV) -> None:
        bad = [name for name, t in (("video", x0.video), ("audio", x0.audio)) if not bool(torch.isfinite(t).all())]
        if bad:
            dt = self.work_dtype if self.model.dtype == self.work_dtype else self.model.dtype
            raise NonFiniteError(
                f"block {block.index} ({block.t_start:g}-{block.t_end:g} s) came out with NaN/Inf {' and '.join(bad)} "
                f"latents; the stream stops here. Check the weights for NaN/Inf (the loader warns about them) or run "
                f"in another dtype (computing in {str(dt).replace('torch.', '')}; fp16 overflows easily: use bf16 or "
                f"fp32)")

    def blocks(self) -> Iterator[Block]:
        """The clip's blocks; an open-ended clip with a given modality ends with the given stream."""
        if self.clip.num_blocks is None and self.given is not None:
            return self.clip.layout.iter_blocks(self.given.num_blocks(self.clip.layout))
        return self.clip.blocks()

    def __iter__(self) -> Iterator[BlockResult]:
        for block in self.blocks():
            yield self.run_block(block)

    def cache_bytes(self) -> int:
        return self.backend.nbytes()


@torch.no_grad()
def stream(model: OmniForcingTransformer, clip: Clip, prompts: Prompts, **kw) -> Iterator[BlockResult]:
    """Yield each finished block the moment it is done."""
    yield from Sampler(model, clip, prompts, **kw)


@torch.no_grad()
def generate(model: OmniForcingTransformer, clip: Clip, prompts: Prompts, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Offline: the stream collected into whole latents (native layout)."""
    if clip.num_blocks is None:
        raise ValueError("generate needs a finite num_blocks; use stream() for an open-ended stream")
    blocks = list(stream(model, clip, prompts, **kw))
    return torch.cat([b.video for b in blocks], 2), torch.cat([b.audio for b in blocks], 2)


@torch.no_grad()
def generate_reference(model: OmniForcingTransformer, clip: Clip, prompts: Prompts, *,
                       policy: CachePolicy = CachePolicy(), runtime: Runtime = Runtime(), **kw):
    """The masked full-sequence reference (slow): same loop, whole prefix re-run every call."""
    if policy.rebase_rope:
        raise ValueError("the prefix (reference) backend uses absolute positions; rebase_rope needs the KV cache")
    return generate(model, clip, prompts, backend=PrefixBackend(model, clip, policy.window, runtime),
                    runtime=runtime, **kw)


__all__ = ["NonFiniteError", "GivenError", "MODALITIES", "Given", "Guidance", "BlockResult", "Backend", "CachedBackend",
           "PrefixBackend", "Sampler", "stream", "generate", "generate_reference"]
