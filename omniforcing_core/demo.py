"""The README's main job: stream audio+video from the embedded default model, block by block,
into a live fragmented MP4 and an HLS playlist, and report time to first chunk and speed.

The embedded default is the toy student trained by this project's own recipe (issue #6: a tiny
OmniForcing student, its caption encoder and codecs, in `omniforcing_core/assets/`), so the demo
shows and sounds the synchronised bounces its captions describe. Without the assets it falls back
to the deterministic random tiny model with preview decoders.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="stream A/V from the embedded tiny model into DIR (no downloads)")
    d.add_argument("--seconds", type=float, default=5)
    d.add_argument("--prompt", default="a red ball bounces twice, a blue square slides")
    d.add_argument("--height", type=int, default=None, help="pixels, a multiple of 32 (default: what the model was trained at)")
    d.add_argument("--width", type=int, default=None, help="pixels, a multiple of 32 (default: what the model was trained at)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--window", type=int, default=0, help="rolling KV window in blocks (0 = keep all)")
    d.add_argument("--random", action="store_true", help="use the random tiny model, not the trained toy student")
    d.add_argument("--assets", default=None, help="a folder of exported toy assets (default: the shipped ones; "
                                                 "`python -m omniforcing_core.toy export --out DIR` writes one)")
    d.add_argument("--out", default="out", help="output folder (omniforcing.mp4, hls/index.m3u8)")
    d.set_defaults(fn=run)


# The toy codecs: the video decoder maps one latent to its own frames (no temporal reach); the audio
# decoder is per latent too, but its Griffin-Lim vocoder is global, so audio windows overlap by a few
# latents and seams are crossfaded (4 mel frames).
TOY_VIDEO_CONTEXT = (0, 0)
TOY_AUDIO_CONTEXT = (6, 2)


def streamer_for(default, writer, time_base):
    """An AVStreamer over the embedded default's decoders (the trained codecs, or the preview ones)."""
    from .av_stream import AVStreamer, preview_streamer
    from .decode import TemporalContext

    if default.codecs is None:
        return preview_streamer(writer, time_base)
    sr = time_base.audio_sample_rate
    return AVStreamer(lambda z: default.decode_video(z).permute(0, 2, 3, 4, 1),
                      lambda z: default.decode_audio(z, sr),
                      video_context=TemporalContext(*TOY_VIDEO_CONTEXT),
                      audio_context=TemporalContext(*TOY_AUDIO_CONTEXT), writer=writer, time=time_base,
                      audio_crossfade=4 * time_base.samples_per_mel_frame)


@torch.no_grad()
def run(args) -> int:
    from .cache import CachePolicy
    from .embedded import DefaultModel, load_default, random_model
    from .layout import make_clip, make_layout
    from .live import LiveWriter
    from .sampling import Sampler

    d = (DefaultModel(random_model("tiny"), None, None, make_layout("v2"), 128, False) if args.random
         else load_default(args.assets))
    height, width = args.height or d.size, args.width or d.size
    out = Path(args.out)
    clip = make_clip(d.layout, height, width, seconds=args.seconds, seed=args.seed)
    text = d.text(args.prompt)
    t = clip.layout.time
    writer = LiveWriter(out, t.fps, t.audio_sample_rate, width, height)
    streamer = streamer_for(d, writer, t)
    policy = CachePolicy(window=args.window or None)
    sampler = Sampler(d.model, clip, text, policy=policy)
    what = "trained toy student" if d.trained else "random tiny model"
    print(f"streaming {clip.seconds:.0f} s of {width}x{height} audio+video ({clip.num_blocks} blocks, "
          f"embedded {what}) into {out}/  prompt: '{args.prompt}'")
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
    report = {"mp4": str(s.paths.mp4), "hls": str(s.paths.playlist), "model": what, "blocks": s.blocks,
              "video_frames": s.video_frames, "video_seconds": round(s.video_seconds, 4),
              "audio_seconds": round(s.audio_seconds, 4),
              "ttfc_s": round(streamer.stats.ttfc_s, 3), "fps": round(s.video_frames / wall, 1),
              "wall_s": round(wall, 2)}
    print(f"time to first chunk {report['ttfc_s']:.3f} s, {report['fps']:.1f} video frames/s "
          f"({s.video_frames} frames, {s.audio_seconds:.2f} s audio in {wall:.2f} s)")
    print(json.dumps(report))
    return 0
