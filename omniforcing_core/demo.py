"""The README's main job: stream a clip from the embedded default and report what happened."""
from __future__ import annotations

import time

import torch


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="stream a clip from the embedded tiny model (no downloads)")
    d.add_argument("--seconds", type=float, default=3)
    d.add_argument("--prompt", default="a red ball bounces twice, a blue square slides")
    d.add_argument("--height", type=int, default=128)
    d.add_argument("--width", type=int, default=192)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default=None, help="output folder")
    d.set_defaults(fn=run)


@torch.no_grad()
def run(args) -> int:
    from .embedded import random_model, toy_text
    from .layout import make_clip, make_layout
    from .sampling import StreamSpec, stream

    model = random_model("tiny")
    clip = make_clip(make_layout("v2"), args.height, args.width, seconds=args.seconds)
    text = toy_text(model, args.prompt)
    t0 = time.perf_counter()
    ttfc = None
    for res in stream(model, StreamSpec.from_clip(clip, seed=args.seed), text):
        if ttfc is None:
            ttfc = time.perf_counter() - t0
        b = res.block
        print(f"block {b.index}: {b.t_start:.2f}-{b.t_end:.2f}s video latents {b.video_start}-{b.video_end} "
              f"audio latents {b.audio_start}-{b.audio_end} in {res.total_ms:.1f} ms")
    wall = time.perf_counter() - t0
    print(f"time to first chunk {ttfc:.3f} s, {clip.num_frames / wall:.1f} video frames/s")
    return 0
