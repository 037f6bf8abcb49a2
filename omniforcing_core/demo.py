"""The README's main job: stream audio+video from the embedded default model, block by block,
into a live fragmented MP4 and an HLS playlist, and report time to first chunk and speed."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="stream A/V from the embedded tiny model into DIR (no downloads)")
    d.add_argument("--seconds", type=float, default=5)
    d.add_argument("--prompt", default="a red ball bounces twice, a blue square slides")
    d.add_argument("--height", type=int, default=128)
    d.add_argument("--width", type=int, default=128)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--window", type=int, default=0, help="rolling KV window in blocks (0 = keep all)")
    d.add_argument("--out", default="out", help="output folder (omniforcing.mp4, hls/index.m3u8)")
    d.set_defaults(fn=run)


@torch.no_grad()
def run(args) -> int:
    from .av_stream import preview_streamer
    from .cache import CachePolicy
    from .embedded import random_model, toy_text
    from .layout import make_clip, make_layout
    from .live import LiveWriter
    from .sampling import Sampler, StreamSpec

    out = Path(args.out)
    clip = make_clip(make_layout("v2"), args.height, args.width, seconds=args.seconds)
    model = random_model("tiny")
    text = toy_text(model, args.prompt)
    t = clip.layout.time
    writer = LiveWriter(out, t.fps, t.audio_sample_rate, args.width, args.height)
    streamer = preview_streamer(writer, t)
    policy = CachePolicy(window=args.window or None)
    sampler = Sampler(model, StreamSpec.from_clip(clip, seed=args.seed), text, policy=policy)
    print(f"streaming {clip.seconds:.0f} s of {args.width}x{args.height} audio+video "
          f"({clip.num_blocks} blocks, embedded tiny model) into {out}/")
    t0 = time.perf_counter()
    streamer.stats.started = t0
    try:
        for res in sampler:
            ch = streamer.push(res)
            b = res.block
            print(f"  block {b.index}: {b.t_start:.0f}-{b.t_end:.0f} s  generated {res.total_ms:6.1f} ms  "
                  f"decoded+written {ch.decode_ms + ch.write_ms:6.1f} ms  "
                  f"-> {streamer.stats.frames} frames, {streamer.stats.samples / t.audio_sample_rate:.2f} s audio")
    finally:
        streamer.finish()  # an interrupted run still leaves a playable file
    wall = time.perf_counter() - t0
    s = writer.summary()
    report = {"mp4": str(s.paths.mp4), "hls": str(s.paths.playlist), "blocks": s.blocks,
              "video_frames": s.video_frames, "video_seconds": round(s.video_seconds, 4),
              "audio_seconds": round(s.audio_seconds, 4),
              "ttfc_s": round(streamer.stats.ttfc_s, 3), "fps": round(s.video_frames / wall, 1),
              "wall_s": round(wall, 2)}
    print(f"time to first chunk {report['ttfc_s']:.3f} s, {report['fps']:.1f} video frames/s "
          f"({s.video_frames} frames, {s.audio_seconds:.2f} s audio in {wall:.2f} s)")
    print(json.dumps(report))
    return 0
