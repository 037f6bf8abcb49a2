"""The official OmniForcing inference, loaded at run time from a checkout of github.com/OmniForcing/OmniForcing,
for side-by-side benchmarks on identical weights. No official code lives in this repository: everything
below imports it from the path it is given (its `ltx-causal` model and wrapper, the vendored `ltx-core`,
`ltx-distillation`'s `CausalAVInferencePipeline` file, and `add_noise` / `denoising_sigmas` taken by name
from `scripts/omniforcing_causal_inference.py`, whose other imports - Gemma, VAEs - are not needed).

`OfficialStream` runs the official `CausalAVInferencePipeline.generate` unchanged in a worker thread and
hands control back after every block (its refresh call), so a benchmark can interleave it block by block
with our sampler: the official loop is timed exactly as shipped, only paused between blocks.
"""
from __future__ import annotations

import ast
import importlib.util
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from .layout import Clip

CAUSAL_SRC = "LTX-2/packages/ltx-causal/src"
CORE_SRC = "LTX-2/packages/ltx-core/src"
PIPELINE = "LTX-2/packages/ltx-distillation/src/ltx_distillation/inference/causal_pipeline.py"
SCRIPT = "LTX-2/packages/ltx-distillation/scripts/omniforcing_causal_inference.py"


class OfficialUnavailable(RuntimeError):
    """The official code is not at the given path, or does not import here."""


class Official:
    """The official classes and functions, imported from a checkout."""

    def __init__(self, root: str | Path):
        root = Path(root)
        missing = [p for p in (CAUSAL_SRC, CORE_SRC, PIPELINE, SCRIPT) if not (root / p).exists()]
        if missing:
            raise OfficialUnavailable(f"{root} is not a checkout of github.com/OmniForcing/OmniForcing "
                                      f"(missing {', '.join(missing)})")
        self.root = root
        for p in (CORE_SRC, CAUSAL_SRC):
            if str(root / p) not in sys.path:
                sys.path.insert(0, str(root / p))
        try:
            from ltx_causal.transformer.causal_model import CausalLTXModel, CausalLTXModelConfig
            from ltx_causal.wrapper import CausalLTX2DiffusionWrapper
            from ltx_core.components.schedulers import LTX2Scheduler
        except Exception as e:  # noqa: BLE001 - any import failure means: cannot compare here
            raise OfficialUnavailable(f"the official code at {root} does not import here: "
                                      f"{type(e).__name__}: {e}") from e
        self.CausalLTXModel, self.CausalLTXModelConfig = CausalLTXModel, CausalLTXModelConfig
        self.Wrapper = CausalLTX2DiffusionWrapper
        fns = _functions(root / SCRIPT, ("add_noise", "denoising_sigmas"),
                         {"torch": torch, "LTX2Scheduler": LTX2Scheduler})
        self.add_noise, self.denoising_sigmas = fns["add_noise"], fns["denoising_sigmas"]

    def pipeline_module(self):
        """A fresh copy of the pipeline module (so one stream's patched globals never reach another)."""
        spec = importlib.util.spec_from_file_location(f"_official_causal_pipeline_{id(object())}", self.root / PIPELINE)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    def model(self, ours, grid_hw: tuple[int, int], debug_stats: bool = True):
        """The official CausalLTXModel (in the wrapper the inference script builds) with our model's weights."""
        c = ours.config
        cfg = self.CausalLTXModelConfig(
            num_layers=c.num_layers, video_dim=c.video_dim, audio_dim=c.audio_dim, video_heads=c.video_heads,
            audio_heads=c.audio_heads, video_d_head=c.video_head_dim, audio_d_head=c.audio_head_dim,
            cross_attention_dim=c.video_dim, audio_cross_attention_dim=c.audio_dim, in_channels=c.in_channels,
            out_channels=c.in_channels, caption_channels=c.caption_channels,
            video_frame_seqlen=grid_hw[0] * grid_hw[1])
        if c.audio_in_channels != c.in_channels:
            raise OfficialUnavailable("the official model has one in_channels for video and audio")
        m = self.CausalLTXModel(cfg).to(device=ours.device, dtype=ours.dtype)
        missing, unexpected = m.load_state_dict(ours.state_dict(), strict=False)
        if missing or unexpected:
            raise OfficialUnavailable(f"our weights do not fit the official model: missing {missing[:4]}, "
                                      f"unexpected {unexpected[:4]}")
        for blk in m.transformer_blocks:
            blk._store_gate_stats = debug_stats
        w = self.Wrapper(model=m, video_height=grid_hw[0] * 32, video_width=grid_hw[1] * 32)
        return w.eval().requires_grad_(False)


def _functions(path: Path, names, namespace: dict) -> dict:
    """Top-level functions of a script, by name, without running its imports."""
    tree = ast.parse(path.read_text(), str(path))
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    if {d.name for d in defs} != set(names):
        raise OfficialUnavailable(f"{path} lacks {sorted(set(names) - {d.name for d in defs})}")
    ns = dict(namespace)
    exec(compile(ast.Module(body=defs, type_ignores=[]), str(path), "exec"), ns)  # noqa: S102
    return {n: ns[n] for n in names}


def to_official_video(v: torch.Tensor) -> torch.Tensor:  # ours [B, C, F, H, W] -> official [B, F, C, H, W]
    return v.permute(0, 2, 1, 3, 4).contiguous()


def to_official_audio(a: torch.Tensor) -> torch.Tensor:  # ours [B, C, T, M] -> official [B, T, C*M]
    return a.permute(0, 2, 1, 3).reshape(a.shape[0], a.shape[2], -1).contiguous()


def from_official_video(v: torch.Tensor) -> torch.Tensor:
    return v.permute(0, 2, 1, 3, 4)


def from_official_audio(a: torch.Tensor, channels: int) -> torch.Tensor:
    return a.reshape(a.shape[0], a.shape[1], channels, -1).permute(0, 2, 1, 3)


class _TorchWithNoise:
    """`torch` as the pipeline module sees it, except randn / randn_like, which hand out given noise in
    the order the pipeline draws it (block start: video, audio; each re-noise: video, audio)."""

    def __init__(self, feed):
        self._feed = feed

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn(self, *shape, device=None, dtype=None, **kw):
        return self._next(device, dtype)

    def randn_like(self, t, **kw):
        return self._next(t.device, t.dtype)

    def _next(self, device, dtype):
        return next(self._feed).to(device=device, dtype=dtype)


class _Stepper:
    """Stands where the pipeline expects its generator: runs every call, and after the cache-refresh
    call that ends a block, parks the worker thread until the next block is asked for."""

    def __init__(self, wrapper, steps: int, stream: "OfficialStream"):
        self.module = wrapper  # the pipeline unwraps `.module` to reach init_av_kv_caches
        self.steps, self.stream, self.calls = steps, stream, 0

    def parameters(self):
        return self.module.parameters()

    def __call__(self, **kw):
        out = self.module(**kw)
        self.calls += 1
        if self.calls % (self.steps + 1) == self.steps:
            self.stream._last = out  # x0 at the last sigma: the block
        elif self.calls % (self.steps + 1) == 0:
            self.stream._block_done()
        return out


class OfficialStream:
    """The official generate() for a whole clip, one block per `next_block()` call (in a worker thread)."""

    def __init__(self, official: Official, ours, clip: Clip, features: torch.Tensor, debug_stats: bool = True,
                 sigmas: Optional[torch.Tensor] = None, noise=None):
        """features: the raw text features [B, L, caption] (the official model projects them itself).
        sigmas: the denoising sigmas incl. the terminal 0 (default: the script's own for 1000,909,725,421,0).
        noise: an iterator of tensors in the official layout to use instead of torch.randn (equality runs)."""
        if clip.num_blocks is None:
            raise ValueError("the official pipeline needs a finite clip")
        self.clip = clip
        self.wrapper = official.model(ours, clip.grid, debug_stats)
        mod = official.pipeline_module()
        if noise is not None:
            mod.torch = _TorchWithNoise(noise)
        dev = ours.device
        if sigmas is None:
            sigmas = official.denoising_sigmas([1000, 909, 725, 421, 0], 40, dev)
        self.sigmas = sigmas.to(dev)
        steps = self.sigmas.numel() - 1
        self.pipeline = mod.CausalAVInferencePipeline(
            generator=_Stepper(self.wrapper, steps, self), add_noise_fn=official.add_noise,
            denoising_sigmas=self.sigmas, num_frame_per_block=3, num_frame_per_block_first=4, context_noise=0,
            num_train_timestep=1000, clear_cuda_cache_per_round=True)
        fv, fa = clip.video_latents, clip.audio_latents
        h, w = clip.grid
        self.video_shape = [clip.batch, fv, ours.config.in_channels, h, w]
        self.audio_shape = [clip.batch, fa, ours.config.audio_in_channels]
        self.cond = {"video_context": features.to(dev, ours.dtype), "audio_context": features.to(dev, ours.dtype)}
        self._go, self._done = threading.Semaphore(0), threading.Semaphore(0)
        self._error: Optional[BaseException] = None
        self._last = None
        self.result = None
        self.cpu_ms: list[float] = []
        self._thread = threading.Thread(target=self._work, daemon=True)
        self._started = False

    def _work(self):
        self._go.acquire()
        self._cpu0 = time.thread_time()
        try:
            self.result = self.pipeline.generate(self.video_shape, self.audio_shape, self.cond, seed=self.clip.seed)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = e
        self._done.release()

    def _block_done(self):
        self.cpu_ms.append((time.thread_time() - self._cpu0) * 1000)  # this thread's CPU time for the block
        self._done.release()
        self._go.acquire()
        self._cpu0 = time.thread_time()

    def next_block(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Run one block of the official loop; returns (ms, video x0 [official layout], audio x0)."""
        if not self._started:
            self._started = True
            self._thread.start()
        t0 = time.perf_counter()
        self._go.release()
        self._done.acquire()
        ms = (time.perf_counter() - t0) * 1000
        if self._error is not None:
            raise self._error
        return ms, self._last[0], self._last[1]

    def close(self):
        """Let the worker finish generate() (after the last block it only returns)."""
        if self._started and self._thread.is_alive():
            self._go.release()
            self._thread.join(timeout=60)


def noise_feed(clip: Clip, steps: int, device, dtype):
    """Our block noise, in the official layout and draw order: per block the initial video/audio noise,
    then the video/audio noise of each re-noise (steps 1..steps-1)."""
    from .noise import block_noise
    for block in clip.blocks():
        for step in range(steps):
            yield to_official_video(block_noise(clip.seed, block.index, "video", step, clip.video_shape(block),
                                                device, dtype))
            yield to_official_audio(block_noise(clip.seed, block.index, "audio", step, clip.audio_shape(block),
                                                device, dtype))
