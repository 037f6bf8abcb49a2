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


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="per-block latency / cache bytes of rolling vs full cache vs prefix re-run")
    b.add_argument("--config", default="bench")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default=None, help="fp32/bf16/fp16 (default fp32 on CPU, bf16 on CUDA)")
    b.add_argument("--height", type=int, default=None)
    b.add_argument("--width", type=int, default=None)
    b.add_argument("--blocks", type=int, default=None)
    b.add_argument("--window", type=int, default=2)
    b.add_argument("--modes", default="rolling,full,prefix")
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
    from .layout import Clip, make_layout
    from .model import Runtime
    from .sampling import PrefixBackend, Sampler

    dev = torch.device(args.device)
    big = args.config.startswith("ltx2")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    height = args.height or (512 if big else 192)
    width = args.width or (768 if big else 288)
    blocks = args.blocks or (5 if big else 10)
    cfg = get_config(args.config)
    t_load = time.perf_counter()
    model = random_model(cfg, seed=0, dtype=dtype, device=dev)
    runtime = Runtime(parallel_modalities=args.parallel_modalities)
    load_s = time.perf_counter() - t_load
    text = toy_text(model, "a red ball bounces twice")
    layout = make_layout("v2")
    clip = Clip(layout, height, width, blocks, seed=0)
    modes = {"rolling": CachePolicy(window=args.window), "full": CachePolicy(), "prefix": None}
    out = {"config": args.config, "device": str(dev), "dtype": str(dtype).replace("torch.", ""),
           "height": height, "width": width, "blocks": blocks, "window": args.window,
           "threads": torch.get_num_threads(), "model_build_s": round(load_s, 3), "modes": {}}
    frames_total = layout.time.video.frames_for_latents(layout.latents_for_blocks(blocks)[0])
    for name in args.modes.split(","):
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
