"""The user's own audio or video for a conditioned stream (A->V, V->A), on the stream's clock.

Files in any format ffmpeg reads are decoded straight to the stream's rate: audio at the stream's
sample rate and channel count, video at its fps (the frame shown at each stream frame time) and frame
size (scaled to cover it, centred crop). In-memory media (ComfyUI's AUDIO and IMAGE) is conformed the
same way in torch. The length rule is one function: a stream covers whole seconds; with no length
asked it covers the media's whole seconds; media up to one video frame shorter than asked is padded
(held frame / silence); anything shorter is a `GivenError` that names both lengths and the fix.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .layout import TimeBase
from .media import MediaError, ffmpeg_path_arg, rate_string, run_ffmpeg
from .sampling import GivenError

READ_TIMEOUT_S = 600


def tolerance_s(time: TimeBase) -> float:
    """How much shorter than asked media may be and still be padded: one video frame."""
    return 1.0 / time.fps


def stream_seconds(duration_s: float, asked: Optional[float], time: TimeBase, what: str) -> int:
    """Whole seconds the stream covers: `asked`, or the media's whole seconds; a GivenError when the
    media is shorter than that."""
    tol = tolerance_s(time)
    have = int(math.floor(duration_s + tol))
    if asked is None:
        if have < 1:
            raise GivenError(f"{what} is {duration_s:.2f} s long; a stream needs at least 1 s: give a longer one")
        return have
    if duration_s + tol < asked:
        fix = f"ask for at most {have} s" if have >= 1 else "a stream needs at least 1 s"
        raise GivenError(f"{what} is {duration_s:.2f} s long, shorter than the {asked:g} s asked: {fix}, "
                         f"or give a longer one")
    return int(round(asked))


def fit_length(x: torch.Tensor, n: int, axis: int, hold_last: bool) -> torch.Tensor:
    """`x` cut or padded to `n` along `axis` (the last item held, or zeros)."""
    have = x.shape[axis]
    if have >= n:
        return x.narrow(axis, 0, n)
    if have == 0:
        raise GivenError("the given media is empty")
    shape = list(x.shape)
    shape[axis] = n - have
    pad = x.narrow(axis, have - 1, 1).expand(shape) if hold_last else x.new_zeros(shape)
    return torch.cat([x, pad], axis)


# -- files -------------------------------------------------------------------------------------------


def _check_file(path, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise GivenError(f"{what} {path}: no such file")
    return p


def _limit(seconds: Optional[float], time: TimeBase) -> list[str]:
    """Read only what a stream of `seconds` can use (plus a little: the last latent reaches past it)."""
    return [] if seconds is None else ["-t", f"{seconds + 4 * tolerance_s(time):.6f}"]


def _last_line(e: MediaError) -> str:
    """ffmpeg's own reason, without the rest of its log."""
    return str(e).split(" | ")[-1].strip()


def _no_stream(e: MediaError) -> bool:
    """ffmpeg found no stream of the kind mapped (the map is optional, so it says the output is empty)."""
    return "does not contain any stream" in str(e)


_LAYOUTS = {"mono": 1, "stereo": 2, "2.1": 3, "3.0": 3, "quad": 4, "4.0": 4, "5.0": 5, "5.1": 6, "6.1": 7, "7.1": 8}


def _output_channels(log: str) -> Optional[int]:
    """Channels of the decoded PCM, from ffmpeg's description of its output stream."""
    m = re.search(r"Output #0.*?Audio: pcm_f32le, \d+ Hz, ([^,\n]+)", log, re.S)
    if not m:
        return None
    name = m.group(1).strip()
    n = re.fullmatch(r"(\d+) channels.*", name)
    return int(n.group(1)) if n else _LAYOUTS.get(name.split("(")[0])


def read_audio(path, time: TimeBase, channels: int = 2, seconds: Optional[float] = None) -> torch.Tensor:
    """The first audio stream of any file ffmpeg reads as float32 [channels, S] at the stream's sample
    rate (at most `seconds` and a little more when given). Decoded in its own channels, then fitted
    as `conform_audio` does (mono duplicated at full level, not ffmpeg's -3 dB upmix)."""
    p = _check_file(path, "--audio")
    args = ["-i", ffmpeg_path_arg(p), *_limit(seconds, time), "-map", "0:a:0?", "-f", "f32le",
            "-ar", str(time.audio_sample_rate), "pipe:1"]
    try:
        proc = run_ffmpeg(["-loglevel", "info", *args], timeout=READ_TIMEOUT_S)
        native = _output_channels(proc.stderr.decode(errors="replace"))
        if native is None:  # a layout we cannot name: let ffmpeg mix it down
            native, raw = channels, run_ffmpeg(["-loglevel", "error", *args[:-1], "-ac", str(channels), "pipe:1"],
                                               timeout=READ_TIMEOUT_S).stdout
        else:
            raw = proc.stdout
    except MediaError as e:
        if _no_stream(e):
            raise GivenError(f"--audio {p}: no audio in it (a video-only file? then use --video)") from None
        raise GivenError(f"--audio {p}: ffmpeg cannot read it ({_last_line(e)})") from None
    wave = np.frombuffer(raw, np.float32).reshape(-1, native).T.copy()
    if wave.shape[1] == 0:
        raise GivenError(f"--audio {p}: the audio in it is empty")
    return conform_audio(torch.from_numpy(wave), time.audio_sample_rate, time, channels)


def read_video(path, time: TimeBase, width: int, height: int, seconds: Optional[float] = None) -> torch.Tensor:
    """The first video stream of any file ffmpeg reads as frames [N, height, width, 3] in [0, 1] at the
    stream's fps, scaled to cover the frame and centre-cropped (at most `seconds` and a little more)."""
    p = _check_file(path, "--video")
    vf = (f"fps={rate_string(time.fps)},scale={width}:{height}:force_original_aspect_ratio=increase,"
          f"crop={width}:{height},format=rgb24")
    try:
        raw = run_ffmpeg(["-loglevel", "error", "-i", ffmpeg_path_arg(p), *_limit(seconds, time), "-map", "0:v:0?",
                          "-vf", vf, "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"], timeout=READ_TIMEOUT_S).stdout
    except MediaError as e:
        if _no_stream(e):
            raise GivenError(f"--video {p}: no video in it (an audio-only file? then use --audio)") from None
        raise GivenError(f"--video {p}: ffmpeg cannot read it ({_last_line(e)})") from None
    frames = np.frombuffer(raw, np.uint8)
    if frames.size == 0:
        raise GivenError(f"--video {p}: the video in it has no frames")
    return torch.from_numpy(frames.reshape(-1, height, width, 3).copy()).float() / 255.0


# -- in memory (ComfyUI AUDIO / IMAGE) ------------------------------------------------------------------


def conform_audio(wave: torch.Tensor, rate: int, time: TimeBase, channels: int = 2) -> torch.Tensor:
    """[C, S] (or [S]) at `rate` -> float32 [channels, S'] at the stream's sample rate (mono widened,
    more channels averaged down)."""
    import torchaudio
    w = wave.float()
    w = w[None] if w.dim() == 1 else w
    if w.dim() != 2 or w.shape[-1] == 0:
        raise GivenError(f"the given audio must be [channels, samples] with samples, got shape {tuple(wave.shape)}")
    if w.shape[0] != channels:
        w = w.mean(0, keepdim=True).expand(channels, -1)
    if int(rate) != time.audio_sample_rate:
        w = torchaudio.functional.resample(w.contiguous(), int(rate), time.audio_sample_rate)
    return w.contiguous()


def conform_frames(frames: torch.Tensor, fps: float, time: TimeBase, width: int, height: int) -> torch.Tensor:
    """[N, H, W, 3] in [0, 1] at `fps` -> [N', height, width, 3] at the stream's fps: the frame on screen
    at each stream frame time, scaled to cover the frame and centre-cropped."""
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise GivenError(f"the given video must be frames [N, H, W, 3] (N >= 1), got shape {tuple(frames.shape)}")
    if not (fps > 0 and math.isfinite(fps)):
        raise GivenError(f"the given video's fps must be a positive number, got {fps}")
    n = frames.shape[0]
    duration = n / fps
    out_n = max(1, int(math.floor(duration * time.fps + 1e-9)))
    idx = [min(n - 1, int(math.floor(i * fps / time.fps + 1e-9))) for i in range(out_n)]
    x = frames[idx].float().permute(0, 3, 1, 2)  # [N', 3, H, W]
    h, w = x.shape[2:]
    scale = max(height / h, width / w)
    sh, sw = max(height, round(h * scale)), max(width, round(w * scale))
    if (sh, sw) != (h, w):
        x = F.interpolate(x, size=(sh, sw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (sh - height) // 2, (sw - width) // 2
    return x[:, :, top:top + height, left:left + width].permute(0, 2, 3, 1).clamp(0, 1).contiguous()


__all__ = ["READ_TIMEOUT_S", "tolerance_s", "stream_seconds", "fit_length", "read_audio", "read_video",
           "conform_audio", "conform_frames"]
