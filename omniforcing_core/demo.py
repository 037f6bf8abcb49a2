"""The README's main job: stream audio+video from the embedded default model, block by block,
into a live fragmented MP4 and an HLS playlist, and report time to first chunk and speed.

The embedded default is the toy student trained by this project's own recipe (issue #6: a tiny
OmniForcing student, its caption encoder and codecs, in `omniforcing_core/assets/`, loaded by
`toy.default`), so the demo shows and sounds the synchronised bounces its captions describe. Without
the assets it falls back to the deterministic random tiny model with preview decoders. The stream
itself is `streaming.run_stream`, the same driver the ComfyUI stream node uses.

`--audio FILE` / `--video FILE` drive the stream with the user's own media (A->V / V->A): the file
is read at the stream's rate and frame size (`usermedia`), encoded with the toy codecs (`toy.encode`),
held clean in every block (`sampling.Given`) while the other modality is generated, and the output
carries the file's own audio / frames (`streaming.GivenMedia`).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from .argtypes import whole_number
from .streaming import MODES


def seconds_arg(text: str) -> float:
    """argparse type: a finite number of seconds (whole seconds are checked by the layout)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text} is not a length; give whole seconds, e.g. 5")
    return x


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="stream A/V from the embedded tiny model into DIR (no downloads)")
    d.add_argument("--seconds", type=seconds_arg, default=None,
                   help="whole seconds (one block per second); default 5, or all whole seconds of --audio/--video")
    d.add_argument("--prompt", default="a red ball bounces twice, a blue square slides")
    d.add_argument("--height", type=int, default=None, help="pixels, a multiple of 32 (default: what the model was trained at)")
    d.add_argument("--width", type=int, default=None, help="pixels, a multiple of 32 (default: what the model was trained at)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--window", type=int, default=0, help="rolling KV window in blocks (0 = keep all)")
    d.add_argument("--decode", default="exact", choices=MODES,
                   help="exact: the stream equals a whole-clip decode; balanced/fast: shorter look-ahead")
    given = d.add_mutually_exclusive_group()
    given.add_argument("--audio", metavar="FILE", default=None,
                       help="your audio (any file ffmpeg reads): the video is generated to it (A->V) and the output "
                            "carries your audio")
    given.add_argument("--video", metavar="FILE", default=None,
                       help="your video (any file ffmpeg reads; scaled and cropped to the frame size): the audio is "
                            "generated to it (V->A) and the output carries your frames")
    d.add_argument("--random", action="store_true", help="use the random tiny model, not the trained toy student")
    d.add_argument("--assets", default=None, help="a folder of exported toy assets (default: the shipped ones; "
                                                 "`python -m omniforcing_core.toy export --out DIR` writes one)")
    d.add_argument("--out", default="out", help="output folder (omniforcing.mp4, hls/index.m3u8)")
    d.add_argument("--hls-window", type=whole_number(0), default=0,
                   help="segments the HLS playlist keeps (a rolling live playlist for long streams; 0 = all)")
    d.set_defaults(fn=run)


@torch.no_grad()
def run(args) -> int:
    from .cache import CachePolicy
    from .layout import make_clip
    from .live import LiveWriter
    from .sampling import Sampler
    from .streaming import decode_plan, run_stream
    # the application may reach into the toy package (library modules do not)
    from .toy.default import asset_files, has_trained_assets, load_default, random_default

    if args.assets is not None and not has_trained_assets(args.assets):
        names = ", ".join(p.name for p in asset_files(args.assets).values())
        raise ValueError(f"--assets {args.assets}: no exported toy assets there ({names}); write them with "
                         f"`python -m omniforcing_core.toy export --out DIR`, or leave --assets out for the shipped ones")
    d = random_default() if args.random else load_default(args.assets)
    height = d.size if args.height is None else args.height  # 0 is an error below, never the default
    width = d.size if args.width is None else args.width
    out = Path(args.out)
    t = d.layout.time
    d.layout.time.latent_grid(height, width)  # a bad size is named before any file is read
    media, seconds = None, 5 if args.seconds is None else args.seconds
    if args.audio is not None or args.video is not None:
        media, seconds = read_given(args, d, width, height)
    clip = make_clip(d.layout, height, width, seconds=seconds, seed=args.seed)
    given = None if media is None else encode_given(d, media, clip)
    plan = decode_plan(args.decode, d.decoders(t), t)
    # the sampler first: its memory pre-flight fails before the writer touches the output folder
    sampler = Sampler(d.model, clip, d.text(args.prompt), policy=CachePolicy(window=args.window or None),
                      given=given)
    writer = LiveWriter(out, t.fps, t.audio_sample_rate, width, height, hls_window=args.hls_window)
    driven = "" if media is None else (f", driven by your {media.modality} {args.audio or args.video}: "
                                       f"the {given.generated} is generated")
    print(f"streaming {clip.seconds:.0f} s of {width}x{height} audio+video ({clip.num_blocks} blocks, "
          f"embedded {d.description}, {args.decode} decode{driven}) into {out}/  prompt: '{args.prompt}'")

    def on_block(res, chunk):
        b = res.block
        print(f"  block {b.index}: {b.t_start:.0f}-{b.t_end:.0f} s  generated {res.total_ms:6.1f} ms  "
              f"decoded+written {chunk.decode_ms + chunk.write_ms:6.1f} ms  "
              f"-> {chunk.end_frame} frames, {chunk.end_sample / t.audio_sample_rate:.2f} s audio")

    run_ = run_stream(sampler, plan, writer, keep_video=False, keep_audio=False, on_block=on_block, given=media)
    s = writer.summary()
    report = {"mp4": str(s.paths.mp4), "hls": str(s.paths.playlist), "model": d.description, "blocks": run_.blocks,
              "given": None if media is None else media.modality,
              "segments": s.blocks,
              "video_frames": s.video_frames, "video_seconds": round(s.video_seconds, 4),
              "audio_seconds": round(s.audio_seconds, 4), "ttfc_s": round(run_.ttfc_s, 3),
              "fps": round(s.video_frames / run_.wall_s, 1), "wall_s": round(run_.wall_s, 2)}
    print(f"time to first chunk {report['ttfc_s']:.3f} s, {report['fps']:.1f} video frames/s "
          f"({s.video_frames} frames, {s.audio_seconds:.2f} s audio in {run_.wall_s:.2f} s)")
    print(json.dumps(report))
    return 0


def read_given(args, d, width: int, height: int):
    """--audio / --video: the file on the stream's clock (`GivenMedia`) and the whole seconds the stream
    covers (--seconds, or all of the file's); a file shorter than asked is a GivenError."""
    from .sampling import GivenError
    from .streaming import GivenMedia
    from .usermedia import read_audio, read_video, stream_seconds
    t = d.layout.time
    if not d.trained or d.codecs is None:
        raise GivenError("--audio/--video need the trained toy's codecs to encode the file: leave out --random "
                         "(and give --assets a folder with trained assets)")
    if args.audio is not None:
        data = read_audio(args.audio, t, channels=2, seconds=args.seconds)
        modality, duration, what = "audio", data.shape[-1] / t.audio_sample_rate, f"--audio {args.audio}"
    else:
        data = read_video(args.video, t, width, height, seconds=args.seconds)
        modality, duration, what = "video", data.shape[0] / t.fps, f"--video {args.video}"
    return GivenMedia(modality, data), stream_seconds(duration, args.seconds, t, what)


def encode_given(d, media, clip):
    """The file's latents for the clip with the toy codecs: `Given` (audio at the toy's 16 kHz mono, video
    at the clip's frame count, the last frame held / silence padding at most one frame's time)."""
    import dataclasses

    from .sampling import Given
    from .toy import world
    from .toy.encode import encode_audio, encode_video
    from .usermedia import conform_audio, fit_length
    t = clip.layout.time
    if media.modality == "audio":
        toy_rate = dataclasses.replace(t, audio_sample_rate=world.SAMPLE_RATE)
        mono = conform_audio(media.data, t.audio_sample_rate, toy_rate, channels=1)
        wave = fit_length(mono, world.num_samples(clip.seconds), -1, hold_last=False)
        return Given("audio", encode_audio(d.codecs, wave))
    frames = fit_length(media.data, clip.num_frames, 0, hold_last=True)
    return Given("video", encode_video(d.codecs, frames.permute(3, 0, 1, 2)[None]))
