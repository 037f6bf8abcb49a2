"""Benchmark: per-block latency and cache size of three ways to generate a stream, in one run.

(a) rolling KV cache (sink + window), (b) full KV cache without eviction, (c) re-running the whole
prefix with masks for every call (the paper's v1 approach). Prints ratios measured side by side;
nothing here is asserted as a wall-clock limit.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from .argtypes import whole_number


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("rolling", "full", "prefix")


positive_int = whole_number(1)


def mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad or [text]}; choose from {','.join(MODES)}")
    return modes


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="per-block latency / cache bytes of rolling vs full cache vs prefix re-run")
    b.add_argument("--config", default="bench")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default fp32 on CPU, bf16 on CUDA")
    b.add_argument("--height", type=positive_int, default=None, help="pixels, a multiple of 32")
    b.add_argument("--width", type=positive_int, default=None, help="pixels, a multiple of 32")
    b.add_argument("--blocks", type=positive_int, default=None)
    b.add_argument("--window", type=positive_int, default=2)
    b.add_argument("--modes", type=mode_list, default=list(MODES), help="comma-separated: rolling,full,prefix")
    b.add_argument("--parallel-modalities", action="store_true",
                   help="run video and audio halves of each layer on two CUDA streams")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(fn=run)


def _gemm_gflops(m: int, k: int, n: int, dtype, device, reps: int = 5) -> float:
    a = torch.randn(m, k, dtype=dtype, device=device)
    w = torch.randn(k, n, dtype=dtype, device=device)
    a @ w
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ w
    _sync(device)
    return 2 * m * k * n * reps / (time.perf_counter() - t) / 1e9


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _block_flops(model, clip, text, policy, runtime) -> float:
    """FLOPs of one steady block (all its forwards), counted by torch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from .sampling import Sampler

    s = Sampler(model, clip, text, policy=policy, runtime=runtime)
    s.run_block(clip.layout.block(0))
    with FlopCounterMode(display=False) as fc:
        s.run_block(clip.layout.block(1))
    return float(fc.get_total_flops())


@torch.no_grad()
def run(args) -> int:
    from .cache import CachePolicy
    from .config import get_config
    from .embedded import random_model, toy_text
    from .layout import make_clip, make_layout
    from .model import Runtime
    from .sampling import PrefixBackend, Sampler

    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device '{args.device}' is not a device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu")
    big = args.config.startswith("ltx2")
    dtype = DTYPES[args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    height = 512 if big and args.height is None else (args.height or 192)
    width = 768 if big and args.width is None else (args.width or 288)
    blocks = args.blocks or (5 if big else 10)  # None only: 0 is refused by positive_int
    layout = make_layout("v2")
    clip = make_clip(layout, height, width, num_blocks=blocks)  # a bad size fails before the model is built
    cfg = get_config(args.config)
    t_load = time.perf_counter()
    model = random_model(cfg, seed=0, dtype=dtype, device=dev)
    runtime = Runtime(parallel_modalities=args.parallel_modalities)
    load_s = time.perf_counter() - t_load
    text = toy_text(model, "a red ball bounces twice")
    modes = {"rolling": CachePolicy(window=args.window), "full": CachePolicy(), "prefix": None}
    out = {"config": args.config, "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
           "height": height, "width": width, "blocks": blocks, "window": args.window,
           "threads": torch.get_num_threads(), "model_build_s": round(load_s, 3), "modes": {}}
    frames_total = layout.time.video.frames_for_latents(layout.latents_for_blocks(blocks)[0])
    for name in args.modes:
        policy = modes[name]
        backend = PrefixBackend(model, clip, runtime=runtime) if policy is None else None
        sampler = Sampler(model, clip, text, policy=policy or CachePolicy(), backend=backend, runtime=runtime)
        per_block, t0, ttfc = [], time.perf_counter(), None
        for res in sampler:
            _sync(dev)
            per_block.append(round(res.total_ms, 2))
            if ttfc is None:
                ttfc = time.perf_counter() - t0
        wall = time.perf_counter() - t0
        steady = per_block[1] if len(per_block) > 1 else per_block[0]
        out["modes"][name] = {"per_block_ms": per_block, "cache_bytes": sampler.cache_bytes(),
                              "ttfc_s": round(ttfc, 4), "wall_s": round(wall, 3),
                              "video_fps": round(frames_total / wall, 2),
                              "last_over_first_steady": round(per_block[-1] / steady, 3)}
    r = out["modes"].get("rolling") or next(iter(out["modes"].values()))
    out["ttfc_s"], out["video_fps"] = r["ttfc_s"], r["video_fps"]
    flops = _block_flops(model, clip, text, CachePolicy(window=args.window), runtime)
    steady_ms = r["per_block_ms"][1] if len(r["per_block_ms"]) > 1 else r["per_block_ms"][0]
    out["block_gflop"] = round(flops / 1e9, 3)
    out["achieved_gflops"] = round(flops / (steady_ms / 1000) / 1e9, 2)
    h, w = layout.time.latent_grid(height, width)
    tokens = layout.block(1).video_len * h * w
    out["gemm_gflops"] = round(_gemm_gflops(tokens, cfg.video_dim, cfg.video_dim * cfg.ff_mult, dtype, dev), 2)
    out["achieved_over_gemm"] = round(out["achieved_gflops"] / out["gemm_gflops"], 3)
    if args.json:
        print(json.dumps(out))
    else:
        print(json.dumps(out, indent=1))
    return 0
