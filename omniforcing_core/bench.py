"""Benchmark: what a stream costs, measured side by side in one run and reported as ratios.

For each mode - (a) rolling KV cache (sink + window), (b) full KV cache without eviction, (c) re-running
the whole prefix with masks at every call (the paper's v1 approach) - the streams advance one block at
a time in turn (interleaved, the order rotating every block), so a busy machine slows them alike:
  * per-block ms (median of the blocks after the first; wall clock, and the thread's CPU time when
    torch runs on one thread), TTFC as the paper defines it (blocks 0 and 1 generated and decoded, here
    by the weight-free preview decoders), video FPS, cache bytes and peak memory;
  * achieved FLOP/s of a steady rolling block (matrix multiplies and attention counted from the ops the
    block runs) against the machine's GEMM rate on the block's own GEMM shapes, the two measured in turn
    (median of the per-round ratios);
  * with `--compare-official PATH` the official `ltx-causal` inference (`official.OfficialStream`) on
    identical weights, as shipped and with its debug statistics off, interleaved block by block with ours;
  * with `--plot PNG` per-block latency against block index for a long stream (60 blocks by default).
Nothing here is asserted as a wall-clock limit; `tests/test_bench.py` checks the counting and the output.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import struct
import sys
import time
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .argtypes import whole_number

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": "fp8"}
MODES = ("rolling", "full", "prefix")

positive_int = whole_number(1)


def mode_list(text: str) -> list[str]:
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"unknown mode(s) {bad or [text]}; choose from {','.join(MODES)}")
    return modes


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"'{text}': give on or off")
    return text == "on"


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="per-block latency, TTFC, FPS, FLOP/s vs GEMM, memory of rolling vs full cache "
                                     "vs prefix re-run (and the official inference with --compare-official)")
    b.add_argument("--config", default="bench", help="model shape: bench (default), tiny, small, ltx2-19b, ...")
    w = b.add_mutually_exclusive_group()
    w.add_argument("--random-weights", action="store_true",
                   help="random weights of --config (the default for the small configs; required for ltx2-*)")
    w.add_argument("--checkpoint", default=None, help="real weights: a checkpoint file or folder (--config is ignored)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default fp32 on CPU, bf16 on CUDA; fp8: e4m3 weights and fp8 GEMMs with bf16 activations")
    b.add_argument("--height", type=positive_int, default=None, help="pixels, a multiple of 32")
    b.add_argument("--width", type=positive_int, default=None, help="pixels, a multiple of 32")
    b.add_argument("--blocks", type=positive_int, default=None, help="blocks (seconds) per stream")
    b.add_argument("--window", type=positive_int, default=2, help="rolling mode: history blocks besides the sink")
    b.add_argument("--modes", type=mode_list, default=None, help="comma-separated: rolling,full,prefix")
    b.add_argument("--parallel-modalities", type=on_off, nargs="?", const=True, default=False, metavar="on|off",
                   help="run video and audio halves of each layer on two CUDA streams")
    b.add_argument("--compile", action="store_true", help="steady blocks through torch.compile (static shapes)")
    b.add_argument("--cuda-graphs", action="store_true", help="steady blocks replayed as CUDA graphs (CUDA only)")
    b.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads (default: torch's)")
    b.add_argument("--rounds", type=positive_int, default=5,
                   help="steady-block / GEMM-set pairs for achieved/GEMM (median of the ratios)")
    b.add_argument("--compare-official", metavar="PATH", default=None,
                   help="a checkout of github.com/OmniForcing/OmniForcing: its inference on identical weights, "
                        "interleaved block by block with ours")
    b.add_argument("--compare-repeat", type=positive_int, default=3,
                   help="interleaved runs of the official comparison (ratios: median over the runs)")
    b.add_argument("--plot", metavar="PNG", default=None, help="write per-block latency vs block index")
    b.add_argument("--plot-blocks", type=positive_int, default=60, help="blocks of the plotted stream")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(fn=run)


# -- measuring -------------------------------------------------------------------------------------

def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Clock:
    """Wall time, and the calling thread's CPU time when torch computes on that thread alone (one
    intra-op thread on a CPU): on a machine shared with other work, CPU time is the steadier measure."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.cpu = self.device.type == "cpu" and torch.get_num_threads() == 1

    def __call__(self, fn: Callable):
        _sync(self.device)
        w0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        _sync(self.device)
        return out, (time.perf_counter() - w0) * 1000, ((time.thread_time() - c0) * 1000 if self.cpu else None)




class FlopCount(TorchDispatchMode):
    """FLOPs of what runs inside: matrix multiplies (2MKN) and fused attention (4 B H Nq Nk d: QK^T and
    PV), plus every GEMM with its weight operand (the model's own tensor, held by reference) to replay
    them. Attention that runs as matrix multiplies (a math kernel) is counted as the multiplies it is."""

    def __init__(self):
        super().__init__()
        self.gemm = 0
        self.attention = 0
        self.gemms: list[tuple] = []  # (op, (M, K), activation dtype, weight operand, bias, extra)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("mm", "_scaled_mm"):
            a, b = args[0], args[1]
            self.gemm += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            extra = (kwargs.get("scale_b"), kwargs.get("out_dtype")) if name == "_scaled_mm" else None
            self.gemms.append((name, tuple(a.shape), a.dtype, b, None, extra))
        elif name == "addmm":
            a, b = args[1], args[2]
            self.gemm += 2 * a.shape[0] * a.shape[1] * b.shape[1]
            self.gemms.append((name, tuple(a.shape), a.dtype, b, args[0], None))
        elif name == "_linear_pointwise":  # oneDNN matmul with a fused epilogue: x [.., K] @ w[N, K]^T
            x, w = args[0], args[1]
            m = x.numel() // x.shape[-1]
            self.gemm += 2 * m * x.shape[-1] * w.shape[0]
            self.gemms.append((name, (m, x.shape[-1]), x.dtype, w, args[2], (args[3], list(args[4]), args[5])))
        elif name in ("bmm", "baddbmm"):
            a, b = (args[0], args[1]) if name == "bmm" else (args[1], args[2])
            self.gemm += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        elif "scaled_dot_product" in name and "backward" not in name:
            q, k = args[0], args[1]
            b_, h, nq, d = q.shape
            self.attention += 4 * b_ * h * nq * k.shape[-2] * d
        return out

    @property
    def total(self) -> int:
        return self.gemm + self.attention


class GemmSet:
    """The GEMMs of one block replayed with the model's own weights (each reads its weight from memory,
    as in the block) on random activations of the same shapes: the rate the machine reaches on the
    model's matrix multiplies alone (no attention, no element-wise work, no Python between them)."""

    def __init__(self, gemms: list[tuple], device):
        self.calls = []
        self.flops = 0
        acts = {}
        g = torch.Generator(device=device).manual_seed(0)
        for op, sa, da, w, bias, extra in gemms:
            if (sa, da) not in acts:
                x = torch.randn(sa, generator=g, device=device)
                acts[(sa, da)] = x.to(da)
            a = acts[(sa, da)]
            n = w.shape[0] if op == "_linear_pointwise" else w.shape[1]
            self.flops += 2 * sa[0] * sa[1] * n
            self.calls.append(self._call(op, a, w, bias, extra, device))

    @staticmethod
    def _call(op, a, w, bias, extra, device):
        if op == "addmm":
            return lambda: torch.addmm(bias, a, w)
        if op == "_linear_pointwise":
            attr, scalars, algo = extra
            return lambda: torch.ops.mkldnn._linear_pointwise(a, w, bias, attr, scalars, algo)
        if op == "_scaled_mm":
            scale_b, out_dtype = extra
            one = torch.ones((), device=device)
            return lambda: torch._scaled_mm(a, w, scale_a=one, scale_b=scale_b if scale_b is not None else one,
                                            out_dtype=out_dtype or torch.bfloat16)
        return lambda: torch.mm(a, w)

    def __call__(self):
        for c in self.calls:
            c()


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _r(x, n=2):
    return None if x is None else round(x, n)


# -- the model and the streams ------------------------------------------------------------------------

def _build(args, dev, dtype):
    from .config import get_config
    from .embedded import random_model
    from .ops import quantize_fp8_

    fp8 = dtype == "fp8"
    cdt = torch.bfloat16 if fp8 else dtype
    if args.checkpoint:
        from .loader import load_model
        model, _ = load_model(args.checkpoint, weight_dtype=torch.float8_e4m3fn if fp8 else cdt, compute_dtype=cdt,
                              device=dev)
        if fp8:
            model = quantize_fp8_(model)  # the loader's fp8 is storage only; this adds the scales and fp8 GEMMs
        return model.eval().requires_grad_(False), cdt
    cfg = get_config(args.config)
    if args.config.startswith("ltx2") and not args.random_weights:
        raise ValueError(f"--config {args.config}: say --random-weights (random {args.config} weights) or give "
                         f"--checkpoint PATH")
    model = random_model(cfg, seed=0, dtype=cdt, device=dev)
    if fp8:
        quantize_fp8_(model)
    return model, cdt


def _text(model, dev):
    from .embedded import toy_text_features
    f = toy_text_features("a red ball bounces twice", model.config.caption_channels).to(dev)
    if model.config.connectors is not None:
        v, a = model.encode_text(f)
        return f, lambda: model.text_kv(v, a)
    return f, lambda: model.text_kv(f, f)


class OurStream:
    """One of our modes, one block per `step()` (text K/V made in the first, as the official loop does),
    each block decoded by the preview decoders."""

    def __init__(self, model, clip, make_text, policy, runtime, prefix: bool = False, decode: bool = True):
        from .decode import StreamingDecoder
        from .preview import preview_decoders
        self.model, self.clip, self.make_text, self.policy, self.runtime = model, clip, make_text, policy, runtime
        self.prefix, self.sampler, self.it = prefix, None, None
        self.decoders = preview_decoders(clip.layout.time).map(StreamingDecoder) if decode else None

    def _start(self):
        from .cache import CachePolicy
        from .sampling import PrefixBackend, Sampler
        text = self.make_text()
        backend = PrefixBackend(self.model, self.clip, runtime=self.runtime) if self.prefix else None
        self.sampler = Sampler(self.model, self.clip, text, policy=self.policy or CachePolicy(), backend=backend,
                               runtime=self.runtime)
        self.it = iter(self.sampler)

    def step(self):
        if self.it is None:
            self._start()
        with torch.no_grad():
            return next(self.it)

    def decode(self, res):
        with torch.no_grad():
            self.decoders.video.push(res.video)
            self.decoders.audio.push(res.audio)

    def cache_bytes(self) -> int:
        return self.sampler.cache_bytes() if self.sampler else 0


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_modes(streams: dict, blocks: int, clock: Clock, frames_per_block: float, device) -> dict:
    """Advance every stream one block at a time, the order rotating each block; returns per-mode stats."""
    names = list(streams)
    cuda = torch.device(device).type == "cuda"
    rec = {n: {"wall": [], "cpu": [], "decode": [], "peak": 0} for n in names}
    for b in range(blocks):
        for n in names[b % len(names):] + names[:b % len(names)]:
            s = streams[n]
            if cuda:
                torch.cuda.reset_peak_memory_stats(device)
            res, wall, cpu = clock(s.step)
            rec[n]["wall"].append(wall)
            rec[n]["cpu"].append(cpu)
            if s.decoders is not None:
                _, dw, _ = clock(lambda: s.decode(res))
                rec[n]["decode"].append(dw)
            if cuda:
                rec[n]["peak"] = max(rec[n]["peak"], torch.cuda.max_memory_allocated(device))
    out = {}
    for n in names:
        r, s = rec[n], streams[n]
        steady = r["wall"][1:] or r["wall"]
        ttfc = sum(r["wall"][:2]) + sum(r["decode"][:2]) if len(r["wall"]) > 1 else None
        med = _median(steady)
        out[n] = {"per_block_ms": [_r(x, 1) for x in r["wall"]],
                  "per_block_cpu_ms": [_r(x, 1) for x in r["cpu"]] if clock.cpu else None,
                  "median_block_ms": _r(med, 1), "median_block_cpu_ms": _r(_median(r["cpu"][1:]), 1),
                  "ttfc_s": _r(ttfc / 1000 if ttfc else None, 3),
                  "decode_ms_median": _r(_median(r["decode"]), 1),
                  "video_fps_steady": _r(frames_per_block / (med / 1000), 2) if med else None,
                  "video_fps_total": _r(frames_per_block * len(r["wall"]) / (sum(r["wall"]) / 1000), 2),
                  "last_over_second": _r(r["wall"][-1] / r["wall"][1], 3) if len(r["wall"]) > 1 else None,
                  "cache_bytes": s.cache_bytes(),
                  "peak_bytes": r["peak"] if cuda else None}
    if not cuda:
        out["_process_peak_rss_bytes"] = _peak_rss()
    return out


def steady_flops(model, clip, make_text, window, runtime, clock, rounds: int):
    """FLOPs of a steady rolling block, and its achieved rate against the GEMM set, measured in turn."""
    from .cache import CachePolicy
    from .sampling import Sampler
    warm = window + 2  # the ring full: every later block is steady
    c = dataclasses.replace(clip, num_blocks=warm + 1 + rounds)
    text = make_text()
    eager = dataclasses.replace(runtime, compile=False, cuda_graphs=False)  # the ops themselves, counted
    with torch.no_grad():
        it = iter(Sampler(model, c, text, policy=CachePolicy(window=window), runtime=eager))
        for _ in range(warm):
            next(it)
        counter = FlopCount()
        with counter:
            next(it)
        it = iter(Sampler(model, c, text, policy=CachePolicy(window=window), runtime=runtime))
        for _ in range(warm + 1):  # (a compiled or captured runtime compiles / captures here)
            next(it)
    gemms = GemmSet(counter.gemms, model.device)
    gemms()  # warm
    pairs = []
    with torch.no_grad():
        for _ in range(rounds):
            _, bw, bc = clock(lambda: next(it))
            _, gw, gc = clock(gemms)
            t_block, t_gemm = (bc, gc) if clock.cpu else (bw, gw)
            pairs.append((counter.total / (t_block / 1000), gemms.flops / (t_gemm / 1000)))
    achieved = _median([a for a, _ in pairs])
    gemm = _median([g for _, g in pairs])
    return {"block_gflop": _r(counter.total / 1e9, 3), "gemm_gflop": _r(counter.gemm / 1e9, 3),
            "attention_gflop": _r(counter.attention / 1e9, 3), "gemm_calls": len(counter.gemms),
            "achieved_gflops": _r(achieved / 1e9), "gemm_set_gflops": _r(gemm / 1e9),
            "achieved_over_gemm": _r(_median([a / g for a, g in pairs]), 3),
            "timed_by": "thread CPU time" if clock.cpu else "wall clock", "rounds": rounds}


# -- the official inference, side by side ---------------------------------------------------------------

def compare_official(path, model, clip, features, make_text, window, clock, device, runtime,
                     repeat: int = 3) -> dict:
    from .cache import CachePolicy
    from .official import (Official, OfficialStream, OfficialUnavailable, from_official_audio,
                           from_official_video, noise_feed)
    from .sampling import Sampler
    from .schedule import make_schedule
    try:
        off = Official(path)
        # equality first (2 blocks, our noise fed to the official loop, our sigmas)
        c2 = dataclasses.replace(clip, num_blocks=2)
        sched = make_schedule()
        sig = torch.tensor([*sched.sigmas, 0.0], device=device)
        eq = OfficialStream(off, model, c2, features, debug_stats=False, sigmas=sig,
                            noise=noise_feed(c2, len(sched.sigmas), device, torch.float32))
        equal = []
        with torch.no_grad():
            for r in Sampler(model, c2, make_text(), runtime=runtime):
                _, ov, oa = eq.next_block()
                ov = from_official_video(ov).to(r.video.dtype)
                oa = from_official_audio(oa, r.audio.shape[1]).to(r.audio.dtype)
                equal.append(max(((ov - r.video).norm() / r.video.norm()).item(),
                                 ((oa - r.audio).norm() / r.audio.norm()).item()))
        eq.close()
    except OfficialUnavailable as e:
        return {"skipped": f"official comparison skipped: {e}"}
    runs = []
    for rep in range(repeat):  # each repetition: fresh streams, one interleaved run
        runners = {"official": OfficialStream(off, model, clip, features, debug_stats=True),
                   "official_debug_off": OfficialStream(off, model, clip, features, debug_stats=False),
                   "ours_full": OurStream(model, clip, make_text, CachePolicy(), runtime, decode=False),
                   "ours_rolling": OurStream(model, clip, make_text, CachePolicy(window=window), runtime,
                                             decode=False)}
        names = list(runners)
        wall = {n: [] for n in names}
        cpu = {n: [] for n in names}
        try:
            for b in range(clip.num_blocks):
                k = (b + rep) % len(names)
                for n in names[k:] + names[:k]:
                    if isinstance(runners[n], OfficialStream):
                        _sync(device)
                        ms, _, _ = runners[n].next_block()
                        _sync(device)
                        wall[n].append(ms)
                        cpu[n].append(runners[n].cpu_ms[-1] if clock.cpu else None)
                    else:
                        _, w, c = clock(runners[n].step)
                        wall[n].append(w)
                        cpu[n].append(c)
        finally:
            for r in runners.values():
                if isinstance(r, OfficialStream):
                    r.close()
        runs.append((wall, cpu))
    names = list(runs[0][0])
    table = {}
    for upto in sorted({min(5, clip.num_blocks), clip.num_blocks}):
        row = {}
        for key, idx in (("wall", 0), ("cpu", 1)):
            if key == "cpu" and not clock.cpu:
                continue
            tots = [{n: sum(run[idx][n][:upto]) for n in names} for run in runs]
            row[f"{key}_ms_median"] = {n: round(_median([t[n] for t in tots])) for n in names}
            row[f"{key}_ms_each_run"] = {n: [round(t[n]) for t in tots] for n in names}
            for base in ("official", "official_debug_off"):
                row[f"speedup_vs_{base}_{key}"] = {n: round(_median([t[base] / t[n] for t in tots]), 3)
                                                   for n in names}
        table[f"{upto}_blocks"] = row
    return {"official": str(path), "equal_rel_l2_per_block": [float(f"{x:.2e}") for x in equal],
            "repeats": repeat, "totals": table,
            "per_block_wall_ms_last_run": {n: [round(x) for x in v] for n, v in runs[-1][0].items()},
            "note": f"{repeat} interleaved runs, block by block (order rotating), ratios are medians over the runs; "
                    "the official loop is CausalAVInferencePipeline.generate unchanged, paused between blocks; "
                    "text K/V made in block 0 by both"}


# -- plot (matplotlib if present, else a small PNG writer) ------------------------------------------------

def plot(path: str, series: dict, title: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, ys in series.items():
            ax.plot(range(len(ys)), ys, label=name)
        ax.set_xlabel("block index")
        ax.set_ylabel("ms per block")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return "matplotlib"
    except ImportError:
        write_png(path, render_plot(series, title))
        return "built-in PNG writer"


COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
# 3x5 glyphs, one row of 3 bits per line (4 = left column)
FONT = {
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 3, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    "a": (2, 5, 7, 5, 5), "b": (6, 5, 6, 5, 6), "c": (3, 4, 4, 4, 3), "d": (6, 5, 5, 5, 6), "e": (7, 4, 6, 4, 7),
    "f": (7, 4, 6, 4, 4), "g": (3, 4, 5, 5, 3), "h": (5, 5, 7, 5, 5), "i": (7, 2, 2, 2, 7), "j": (1, 1, 1, 5, 2),
    "k": (5, 5, 6, 5, 5), "l": (4, 4, 4, 4, 7), "m": (5, 7, 7, 5, 5), "n": (6, 5, 5, 5, 5), "o": (2, 5, 5, 5, 2),
    "p": (6, 5, 6, 4, 4), "q": (2, 5, 5, 6, 3), "r": (6, 5, 6, 5, 5), "s": (3, 4, 2, 1, 6), "t": (7, 2, 2, 2, 2),
    "u": (5, 5, 5, 5, 7), "v": (5, 5, 5, 5, 2), "w": (5, 5, 7, 7, 5), "x": (5, 5, 2, 5, 5), "y": (5, 5, 2, 2, 2),
    "z": (7, 1, 2, 4, 7), " ": (0, 0, 0, 0, 0), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0), "(": (1, 2, 2, 2, 1),
    ")": (4, 2, 2, 2, 4), "/": (1, 1, 2, 4, 4), "=": (0, 7, 0, 7, 0), ",": (0, 0, 0, 2, 4), ":": (0, 2, 0, 2, 0),
    "_": (0, 0, 0, 0, 7),
}


def _draw_text(img, x, y, s, color=(0, 0, 0), k=2):
    h, w = len(img), len(img[0]) // 3
    for ch in s.lower():
        rows = FONT.get(ch, FONT[" "])
        for r, bits in enumerate(rows):
            for c in range(3):
                if bits & (4 >> c):
                    for dy in range(k):
                        for dx in range(k):
                            yy, xx = y + r * k + dy, x + c * k + dx
                            if 0 <= yy < h and 0 <= xx < w:
                                img[yy][3 * xx:3 * xx + 3] = bytes(color)
        x += 4 * k


def _line(img, x0, y0, x1, y1, color):
    h, w = len(img), len(img[0]) // 3
    n = max(abs(x1 - x0), abs(y1 - y0), 1)
    for i in range(n + 1):
        x = round(x0 + (x1 - x0) * i / n)
        y = round(y0 + (y1 - y0) * i / n)
        for dy in (0, 1):
            if 0 <= y + dy < h and 0 <= x < w:
                img[y + dy][3 * x:3 * x + 3] = bytes(color)


def render_plot(series: dict, title: str, width: int = 800, height: int = 450) -> list:
    """Rows of RGB bytes: one polyline per series, axes with min/max ticks, a legend, the title."""
    img = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]
    left, right, top, bottom = 70, width - 20, 40, height - 50
    n = max(len(v) for v in series.values())
    ymax = max(max(v) for v in series.values()) * 1.1 or 1.0
    _line(img, left, bottom, right, bottom, (0, 0, 0))
    _line(img, left, top, left, bottom, (0, 0, 0))
    for frac in (0.0, 0.5, 1.0):
        y = round(bottom - frac * (bottom - top))
        _line(img, left - 5, y, left, y, (0, 0, 0))
        _draw_text(img, 4, y - 5, f"{frac * ymax:.0f}")
    for tick in sorted({0, (n - 1) // 2, n - 1}):
        x = round(left + tick / max(1, n - 1) * (right - left))
        _line(img, x, bottom, x, bottom + 5, (0, 0, 0))
        _draw_text(img, x - 8, bottom + 10, str(tick))
    _draw_text(img, (left + right) // 2 - 40, bottom + 30, "block index")
    _draw_text(img, 4, top - 25, "ms per block")
    _draw_text(img, left + 120, 8, title[:80])
    for i, (name, ys) in enumerate(series.items()):
        col = COLORS[i % len(COLORS)]
        pts = [(round(left + (j / max(1, n - 1)) * (right - left)), round(bottom - (v / ymax) * (bottom - top)))
               for j, v in enumerate(ys)]
        for a, b in zip(pts, pts[1:]):
            _line(img, *a, *b, col)
        _line(img, right - 150, top + 10 + 16 * i, right - 130, top + 10 + 16 * i, col)
        _draw_text(img, right - 125, top + 5 + 16 * i, name, col)
    return img


def write_png(path: str, rows: list) -> None:
    h, w = len(rows), len(rows[0]) // 3

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + bytes(r) for r in rows)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


# -- the command ----------------------------------------------------------------------------------------

def _gib(n) -> Optional[float]:
    return None if n is None else round(n / 2 ** 30, 4)


@torch.no_grad()
def run(args) -> int:
    from .budget import plan_cache
    from .cache import CachePolicy
    from .layout import make_clip, make_layout
    from .model import Runtime

    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device '{args.device}' is not a device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu")
    if args.cuda_graphs and dev.type != "cuda":
        raise ValueError("--cuda-graphs needs --device cuda")
    if args.cuda_graphs and args.parallel_modalities:
        raise ValueError("--cuda-graphs captures one CUDA stream: use --parallel-modalities off with it")
    if args.threads:
        torch.set_num_threads(args.threads)
    big = args.config.startswith("ltx2")
    dtype = DTYPES[args.dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    height = 512 if big and args.height is None else (args.height or 192)
    width = 768 if big and args.width is None else (args.width or 288)
    blocks = args.blocks or (5 if big else 10)
    modes = args.modes or (["rolling", "full"] if big else list(MODES))
    layout = make_layout("v2")
    clip = make_clip(layout, height, width, num_blocks=blocks)  # a bad size fails before the model is built
    t0 = time.perf_counter()
    model, cdt = _build(args, dev, dtype)
    _sync(dev)
    build_s = time.perf_counter() - t0
    runtime = Runtime(compute_dtype=cdt, parallel_modalities=args.parallel_modalities, compile=args.compile,
                      cuda_graphs=args.cuda_graphs)
    features, make_text = _text(model, dev)
    clock = Clock(dev)
    policies = {"rolling": CachePolicy(window=args.window), "full": CachePolicy(), "prefix": None}
    out = {"config": args.checkpoint or args.config, "weights": "checkpoint" if args.checkpoint else "random",
           "parameters": sum(p.numel() for p in model.parameters()), "device": str(dev),
           "dtype": "fp8 (e4m3 weights, fp8 GEMMs, bf16 activations)" if dtype == "fp8" else str(cdt)[6:],
           "height": height, "width": width, "blocks": blocks, "window": args.window,
           "threads": torch.get_num_threads(), "parallel_modalities": args.parallel_modalities,
           "compile": args.compile, "cuda_graphs": args.cuda_graphs, "model_build_s": round(build_s, 2)}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
        out["weights_bytes"] = torch.cuda.memory_allocated(dev)
    # what each cache mode will take, stated before anything runs
    plans = {m: plan_cache(model, clip, args.window if m == "rolling" else 0, 1, cdt) for m in modes if m != "prefix"}
    out["memory_plan"] = {m: p.describe() for m, p in plans.items()}
    if not args.json:
        print("memory plan: " + "; ".join(f"{m}: {d}" for m, d in out["memory_plan"].items()), file=sys.stderr)
    frames_per_block = layout.time.video.frames_for_latents(layout.latents_for_blocks(blocks)[0]) / blocks
    streams = {m: OurStream(model, clip, make_text, policies[m], runtime, prefix=(m == "prefix")) for m in modes}
    out["modes"] = run_modes(streams, blocks, clock, frames_per_block, dev)
    del streams
    ref = out["modes"].get("rolling") or out["modes"][modes[0]]
    out["ttfc_s"], out["video_fps_steady"] = ref["ttfc_s"], ref["video_fps_steady"]
    out["steady_block"] = steady_flops(model, clip, make_text, args.window, runtime, clock, args.rounds)
    if args.compare_official:
        out["compare_official"] = compare_official(args.compare_official, model, clip, features, make_text,
                                                   args.window, clock, dev, runtime, args.compare_repeat)
        if "skipped" in out["compare_official"] and not args.json:
            print(out["compare_official"]["skipped"], file=sys.stderr)
    if args.plot:
        from .budget import available_bytes
        n = args.plot_blocks
        long = make_clip(layout, height, width, num_blocks=n)
        free = available_bytes(dev)
        plot_modes, left_out = [], {}
        for m in ("rolling", "full"):
            need = plan_cache(model, long, args.window if m == "rolling" else 0, 1, cdt).total_bytes
            if free is not None and need > free:
                left_out[m] = f"needs {_gib(need)} GiB for {n} blocks, {_gib(free)} GiB free"
            else:
                plot_modes.append(m)
        series_src = {m: OurStream(model, long, make_text, policies[m], runtime, decode=False) for m in plot_modes}
        stats = run_modes(series_src, n, clock, frames_per_block, dev)
        key, what = ("per_block_cpu_ms", "thread cpu ms") if clock.cpu else ("per_block_ms", "ms")
        series = {m: stats[m][key] for m in series_src}
        how = plot(args.plot, series, f"{out['config']} {height}x{width} {out['dtype']}: {what} per block, {n} blocks")
        out["plot"] = {"path": args.plot, "drawn_with": how, "blocks": n, "left_out": left_out, "plotted": key,
                       "last_over_second": {m: stats[m]["last_over_second"] for m in series},
                       "median_ms": {m: stats[m]["median_block_ms"] for m in series}}
    print(json.dumps(out) if args.json else json.dumps(out, indent=1))
    return 0
