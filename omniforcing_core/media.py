"""One-shot MP4 (H.264 + AAC) writing and media probing, using imageio-ffmpeg's bundled ffmpeg.

No ffprobe ships with imageio-ffmpeg, so probing decodes the file with `-f framecrc`: one line per
decoded frame with its timestamp, which gives exact frame counts, sample counts and start times.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from .fmp4 import AAC_SAMPLE_RATES

PathLike = Union[str, os.PathLike]

FALLBACK_AUDIO_RATE = 48000  # AAC cannot carry other rates; ffmpeg resamples to this
PROBE_TIMEOUT_S = 120.0  # probing/decoding never hangs a caller (e.g. on a stream that never ends)


class MediaError(RuntimeError):
    """ffmpeg failed or the input cannot be encoded as asked; the message says why."""


class NonFiniteError(MediaError):
    """The frames or audio to encode hold NaN/Inf (a diverged model or decoder)."""


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def child_process_options() -> dict:
    """Popen options for our ffmpeg children: their own process group, so a terminal's Ctrl-C (sent to
    the whole foreground group) reaches only us. We then stop them in order: the AAC encoder is
    flushed, not cut off mid-stream, and a half-run x264 is killed by `subprocess.run` itself.

    A process group, not a new session, where Python allows it (3.11+): with the Linux scheduler's
    autogroups every session is scheduled as one unit, and on a busy machine an x264 run in a fresh
    session took ~1.5x as long (measured 53 -> 78 ms per block)."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"start_new_session": True}


def ffmpeg_path_arg(path: PathLike) -> str:
    """A file path as ffmpeg must get it: absolute, so `-x.mp4` is not an option and `a:b.mp4` not a protocol."""
    return os.path.abspath(os.fspath(path))


def run_ffmpeg(args: list[str], input: Optional[bytes] = None, timeout: Optional[float] = None
               ) -> subprocess.CompletedProcess:
    """Run ffmpeg to completion. communicate() drains stdout and stderr while feeding stdin: no deadlock."""
    head = [ffmpeg_exe(), "-hide_banner"] + (["-nostdin"] if input is None else [])
    try:
        proc = subprocess.run(head + args, input=input, capture_output=True, timeout=timeout,
                              **child_process_options())
    except subprocess.TimeoutExpired as e:
        raise MediaError(f"ffmpeg did not finish within {timeout} s: {' '.join(args[:12])} ...") from e
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise MediaError(f"ffmpeg failed ({proc.returncode}): {' | '.join(err[-5:])}")
    return proc


def rate_string(fps: float) -> str:
    """24 -> '24/1', 23.976 -> '24000/1001': ffmpeg wants exact rational frame rates."""
    f = Fraction(fps).limit_denominator(1001)
    return f"{f.numerator}/{f.denominator}"


def aac_rate(sample_rate: int) -> int:
    return sample_rate if sample_rate in AAC_SAMPLE_RATES else FALLBACK_AUDIO_RATE


# ---------------------------------------------------------------------------------------------
# array conversion (numpy or torch in, numpy out)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, without importing torch here
        x = x.detach().float().cpu().numpy() if x.dtype.is_floating_point else x.detach().cpu().numpy()
    return np.asarray(x)


def require_finite(a: np.ndarray, what: str) -> None:
    """MediaError naming `what` if a float array holds NaN/Inf (one float64 sum: no big temporaries)."""
    if a.dtype.kind != "f" or a.size == 0 or np.isfinite(np.add.reduce(a, axis=None, dtype=np.float64)):
        return
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))  # the sum may overflow on finite values: count
    if bad:
        raise NonFiniteError(f"NaN/Inf in the {what}: {bad} of {a.size} values are not finite "
                             f"(the model or its decoder diverged, e.g. overflow in half precision)")


def to_uint8_frames(frames: Any, what: str = "frames") -> np.ndarray:
    """[N, H, W, 3] uint8 from uint8 or float-in-[0, 1] frames ([N,H,W], [N,H,W,1] and RGBA also accepted)."""
    a = _numpy(frames)
    require_finite(a, what)
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
        raise MediaError(f"frames must be [N, H, W, 3] (or 1/4 channels), got shape {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    a = a[..., :3]
    if a.dtype != np.uint8:
        a = np.round(np.clip(a.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(a)


def even_frames(frames: np.ndarray, odd_size: str = "pad") -> tuple[np.ndarray, bool]:
    """yuv420p needs even width/height: pad right/bottom by repeating the edge, or refuse."""
    h, w = frames.shape[1:3]
    if h % 2 == 0 and w % 2 == 0:
        return frames, False
    if odd_size != "pad":
        raise MediaError(f"frame size {w}x{h} is odd; H.264 yuv420p needs even sizes: "
                         f"use {w + w % 2}x{h + h % 2} or odd_size='pad'")
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge"), True


def to_waveform(audio: Any, what: str = "audio") -> np.ndarray:
    """float32 [C, T] from [T] (mono) or [C, T]; a leading batch of 1 is dropped."""
    a = _numpy(audio)
    require_finite(a, what)
    a = a.astype(np.float32, copy=False)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[0] > 8:
        raise MediaError(f"audio must be [C, T] with C <= 8 (or mono [T]), got shape {a.shape}")
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------------------------------------
# one-shot MP4


@dataclass(frozen=True)
class WrittenMedia:
    """What `write_mp4` put in the file."""

    path: Path
    width: int
    height: int
    num_frames: int
    fps: float
    padded: bool  # odd input size padded to even
    audio_samples: int = 0
    sample_rate: Optional[int] = None  # input audio rate
    audio_channels: int = 0
    encoded_sample_rate: Optional[int] = None  # rate inside the file (resampled if AAC lacks the input rate)

    @property
    def video_seconds(self) -> float:
        return self.num_frames / self.fps

    @property
    def audio_seconds(self) -> float:
        return self.audio_samples / self.sample_rate if self.sample_rate else 0.0


def write_mp4(path: PathLike, frames: Any, fps: float, audio: Any = None, sample_rate: int = 24000, *,
              crf: int = 18, preset: str = "veryfast", audio_bitrate: str = "192k",
              odd_size: str = "pad") -> WrittenMedia:
    """H.264 yuv420p + AAC MP4. Video frame n plays at n/fps and audio sample m at m/sample_rate.

    Video goes through stdin and audio through a temporary raw file, so ffmpeg never waits on one
    pipe while we block writing the other. The MP4 muxer's edit list hides AAC priming.

    The file is written under a temporary name beside `path` and renamed when complete: a failed
    run never leaves a half file or destroys an earlier one.
    """
    path = Path(path)
    if path.is_dir():
        raise MediaError(f"{path} is a folder: give the MP4 a file name")
    video, padded = even_frames(to_uint8_frames(frames), odd_size)
    n, h, w = video.shape[:3]
    if n == 0:
        raise MediaError("no frames to write")
    wave = None if audio is None else to_waveform(audio)
    if wave is not None and wave.shape[1] == 0:
        wave = None
    args = ["-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
            "-framerate", rate_string(fps), "-i", "pipe:0"]
    with tempfile.TemporaryDirectory(prefix="omniforcing_") as tmp:
        out_rate = None
        if wave is not None:
            raw = Path(tmp) / "audio.f32"
            np.ascontiguousarray(wave.T).tofile(raw)  # interleaved
            out_rate = aac_rate(sample_rate)
            args += ["-f", "f32le", "-ar", str(sample_rate), "-ac", str(wave.shape[0]),
                     "-i", ffmpeg_path_arg(raw)]
        args += ["-map", "0:v:0", "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p"]
        if wave is not None:
            args += ["-map", "1:a:0", "-c:a", "aac", "-b:a", audio_bitrate, "-ar", str(out_rate)]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MediaError(f"cannot create the folder {path.parent} ({e.strerror}): choose another path") from None
        part = path.with_name(f".{path.name}.part")
        try:
            run_ffmpeg(args + ["-movflags", "+faststart", "-f", "mp4", ffmpeg_path_arg(part)], input=video.tobytes())
            os.replace(part, path)
        finally:
            if part.exists():
                part.unlink()
    return WrittenMedia(path, w, h, n, float(fps), padded,
                        audio_samples=0 if wave is None else wave.shape[1],
                        sample_rate=None if wave is None else sample_rate,
                        audio_channels=0 if wave is None else wave.shape[0], encoded_sample_rate=out_rate)


# ---------------------------------------------------------------------------------------------
# probing and decoding


@dataclass(frozen=True)
class StreamInfo:
    """One decoded stream: `frames` are video frames, or audio frames (packets) with `samples` samples."""

    kind: str  # "video" | "audio"
    codec: str  # codec in the file, e.g. h264, aac
    frames: int
    start: float  # s, first decoded timestamp (relative to the file's start)
    end: float  # s, last timestamp + its duration
    width: int = 0
    height: int = 0
    sample_rate: int = 0
    channels: int = 0
    samples: int = 0

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class MediaInfo:
    path: Path
    streams: tuple[StreamInfo, ...]

    @property
    def num_streams(self) -> int:
        return len(self.streams)

    @property
    def video(self) -> Optional[StreamInfo]:
        return next((s for s in self.streams if s.kind == "video"), None)

    @property
    def audio(self) -> Optional[StreamInfo]:
        return next((s for s in self.streams if s.kind == "audio"), None)

    @property
    def av_drift(self) -> float:
        """Audio end minus video end (s); 0 without both streams."""
        return self.audio.end - self.video.end if self.video and self.audio else 0.0

    @property
    def duration(self) -> float:
        return max((s.end for s in self.streams), default=0.0) - min((s.start for s in self.streams), default=0.0)


_STREAM_RE = re.compile(r"Stream #0:\d+\S*: (Video|Audio): (\w+)")
_LAYOUT_CHANNELS = {"mono": 1, "stereo": 2}


def _input_args(path: Path, tmp: str) -> list[str]:
    if path.suffix != ".m3u8":
        return ["-i", ffmpeg_path_arg(path)]
    text = path.read_text()
    if "#EXT-X-ENDLIST" not in text:
        # A live playlist makes ffmpeg wait for new segments (minutes). Probe a snapshot: a copy that
        # ends here, with absolute segment paths, in our temp dir (the live directory is not touched).
        base = path.resolve().parent
        lines = []
        for line in text.splitlines():
            if line.startswith("#EXT-X-MAP:"):
                line = re.sub(r'URI="([^"]+)"', lambda m: f'URI="{(base / m.group(1)).as_posix()}"', line)
            elif line and not line.startswith("#"):
                line = (base / line).as_posix()
            lines.append(line)
        path = Path(tmp) / "snapshot.m3u8"
        path.write_text("\n".join(lines + ["#EXT-X-ENDLIST", ""]))
    return ["-allowed_extensions", "ALL", "-i", ffmpeg_path_arg(path)]


def _run_on(path: Path, before_input: list[str], after_input: list[str]) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="omniforcing_probe_") as tmp:
        return run_ffmpeg([*before_input, *_input_args(path, tmp), *after_input], timeout=PROBE_TIMEOUT_S)


def probe_media(path: PathLike) -> MediaInfo:
    """Decode every audio/video stream and count frames and samples from their timestamps.

    Works on MP4 (also one still being written) and on HLS playlists, live ones included.
    """
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path} does not exist")
    proc = _run_on(path, ["-loglevel", "info"],
                   ["-map", "0:v?", "-map", "0:a?", "-fps_mode", "passthrough", "-f", "framecrc", "-"])
    codecs = {"video": [], "audio": []}
    for kind, codec in _STREAM_RE.findall(proc.stderr.decode(errors="replace").split("Stream mapping")[0]):
        codecs[kind.lower()].append(codec)
    header: dict[int, dict[str, str]] = {}
    rows: dict[int, list[tuple[int, int]]] = {}
    for line in proc.stdout.decode().splitlines():
        if line.startswith("#"):
            m = re.match(r"#(\w+) (\d+): (.*)", line)
            if m:
                header.setdefault(int(m.group(2)), {})[m.group(1)] = m.group(3).strip()
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4:
            rows.setdefault(int(parts[0]), []).append((int(parts[2]), int(parts[3])))
    streams, seen = [], {"video": 0, "audio": 0}
    for idx in sorted(header):
        h = header[idx]
        kind = h.get("media_type", "")
        if kind not in seen:
            continue
        num, den = (int(x) for x in h["tb"].split("/"))
        pts = rows.get(idx, [])
        start = pts[0][0] * num / den if pts else 0.0
        end = (pts[-1][0] + pts[-1][1]) * num / den if pts else 0.0
        names = codecs[kind]
        codec = names[seen[kind]] if seen[kind] < len(names) else "?"
        seen[kind] += 1
        if kind == "video":
            w, hh = (int(x) for x in h.get("dimensions", "0x0").split("x"))
            streams.append(StreamInfo("video", codec, len(pts), start, end, width=w, height=hh))
        else:
            layout = h.get("channel_layout_name", "")
            ch = _LAYOUT_CHANNELS.get(layout) or int(re.match(r"(\d+)", layout or "0").group(1) or 0)
            samples = sum(d for _, d in pts) if num == 1 else 0  # tb 1/sr: durations are sample counts
            streams.append(StreamInfo("audio", codec, len(pts), start, end,
                                      sample_rate=int(h.get("sample_rate", 0)), channels=ch, samples=samples))
    return MediaInfo(path, tuple(streams))


def decode_audio(path: PathLike, sample_rate: Optional[int] = None, channels: Optional[int] = None) -> np.ndarray:
    """First audio stream as float32 [C, T] (native rate and channels unless given)."""
    path = Path(path)
    if channels is None or sample_rate is None:
        info = probe_media(path).audio
        if info is None:
            raise MediaError(f"{path} has no audio stream")
        channels = channels or info.channels
        sample_rate = sample_rate or info.sample_rate
    raw = _run_on(path, ["-loglevel", "error"], ["-map", "0:a:0", "-f", "f32le", "-ac", str(channels),
                                                 "-ar", str(sample_rate), "pipe:1"]).stdout
    return np.frombuffer(raw, np.float32).reshape(-1, channels).T.copy()


def decode_video_gray(path: PathLike) -> np.ndarray:
    """First video stream as uint8 luma [N, H, W], every decoded frame once (no rate conversion)."""
    path = Path(path)
    info = probe_media(path).video
    if info is None:
        raise MediaError(f"{path} has no video stream")
    raw = _run_on(path, ["-loglevel", "error"], ["-map", "0:v:0", "-fps_mode", "passthrough",
                                                 "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"]).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width).copy()


__all__ = [
    "MediaError", "NonFiniteError", "ffmpeg_exe", "child_process_options", "ffmpeg_path_arg", "run_ffmpeg",
    "rate_string", "aac_rate", "require_finite", "to_uint8_frames", "even_frames", "to_waveform", "WrittenMedia",
    "write_mp4", "StreamInfo", "MediaInfo", "probe_media", "decode_audio", "decode_video_gray",
]
