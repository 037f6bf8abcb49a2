"""Live writers: a growing fragmented MP4 and an HLS playlist, fed one generated block at a time.

Design (why not one ffmpeg process with two input pipes): ffmpeg reads its inputs in timestamp
order, so a big video write can block while ffmpeg waits for audio on the other pipe (deadlock
without careful threading), its fragmenting muxer holds the newest fragment until the next
keyframe, and after a kill the last block is lost. Instead:

* video: one short ffmpeg (x264) run per block. Every block is a closed GOP starting with an IDR,
  i.e. a keyframe per block, and the run ends before `write()` returns.
* audio: ONE long-lived ffmpeg AAC encoder (raw PCM in, ADTS out), so the AAC stream is continuous
  across blocks (no per-block priming, no seams). A reader thread drains its stdout, so our stdin
  writes can never block on a full output pipe.
* muxing: our own fMP4 writer (`fmp4.py`). After each block we append one moof+mdat fragment to
  the MP4 and write the same bytes as an HLS segment, then flush. Whatever was written when the
  process dies is a valid, playable file.

One clock: video frame n is at n/fps, audio sample m at m/sample_rate, both from t=0. The AAC
encoder's 1024 priming samples are hidden by an edit list in the init segment, so A/V sync does
not depend on block sizes. The AAC encoder holds back a few packets (measured 3-6, i.e. 0.1-0.25 s at
24 kHz), so a fragment's audio may end slightly before its video; the rest rides in the next fragment
(or the final one on close), and a killed stream loses only that much audio.
"""
from __future__ import annotations

import math
import os
import subprocess
import threading
import time
import weakref
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .fmp4 import (AAC_FRAME, AudioTrack, Sample, TrackRun, VideoTrack, access_units, avcc_sample, init_segment,
                   media_fragment, parameter_sets, split_adts, split_annexb)
from .media import MediaError, PathLike, aac_rate, even_frames, ffmpeg_exe, rate_string, run_ffmpeg, to_uint8_frames, \
    to_waveform

AAC_PRIMING = 1024  # ffmpeg's native AAC encoder delay (samples); checked by the A/V offset test
_ENCODER_LAG_PACKETS = 8  # packets the encoder may legitimately still hold after a write (measured 3-5)
_SETTLE_S = 0.03  # after that, keep taking packets until the encoder is quiet this long


@dataclass(frozen=True)
class LivePaths:
    mp4: Path
    hls_dir: Optional[Path]
    playlist: Optional[Path]


@dataclass(frozen=True)
class BlockWritten:
    """State after one `write()`: everything counted here is on disk."""

    index: int
    video_frames: int  # total
    video_seconds: float
    audio_seconds: float  # audio muxed so far (presentation time)
    segment: Optional[Path]
    fragment_bytes: int


@dataclass(frozen=True)
class LiveSummary:
    paths: LivePaths
    blocks: int
    video_frames: int
    video_seconds: float
    audio_samples: int  # fed, at the input rate
    audio_seconds: float
    segments: tuple[Path, ...]


class _AacEncoder:
    """Long-lived ffmpeg: f32le PCM on stdin -> ADTS on stdout, drained by a thread."""

    def __init__(self, in_rate: int, out_rate: int, channels: int, bitrate: str):
        self.proc = subprocess.Popen(
            [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "f32le", "-ar", str(in_rate),
             "-ac", str(channels), "-i", "pipe:0", "-c:a", "aac", "-b:a", bitrate, "-ar", str(out_rate),
             "-f", "adts", "-flush_packets", "1", "pipe:1"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.packets: list[bytes] = []
        self._pending = b""
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="omniforcing-aac-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            data = self.proc.stdout.read1(1 << 16)
            if not data:
                break
            frames, self._pending = split_adts(self._pending + data)
            with self._cond:
                self.packets.extend(frames)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def write(self, pcm: np.ndarray) -> None:
        """pcm [C, T] float32; blocks only while ffmpeg consumes it (the reader keeps it moving)."""
        try:
            self.proc.stdin.write(np.ascontiguousarray(pcm.T).tobytes())
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise MediaError("the AAC encoder process died") from e

    def wait_for(self, count: int, settle: float, timeout: float) -> None:
        """Until `count` packets are out, then until none arrived for `settle` s; never past `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._reader.is_alive():
                have, now = len(self.packets), time.monotonic()
                if now >= deadline:
                    break
                if have >= count:
                    self._cond.wait(min(settle, deadline - now))
                    if len(self.packets) == have:
                        break
                else:
                    self._cond.wait(deadline - now)

    def take(self, start: int) -> list[bytes]:
        """Packets from index `start` on (the reader thread may be appending concurrently)."""
        with self._cond:
            return self.packets[start:]

    def finish(self, timeout: float = 30.0) -> None:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self._reader.join(timeout)
        self.proc.wait(timeout)


class LiveWriter:
    """Block-by-block fMP4 + HLS writer. `write(frames, audio)` per block, `close()` at the end.

    frames: [N, H, W, 3] uint8 or float in [0, 1]; audio: [C, T] (or [T]) float at `sample_rate`,
    or None (silence up to the video clock). sample_rate=None writes video only.
    """

    def __init__(self, out_dir: PathLike, fps: float, sample_rate: Optional[int], width: int, height: int, *,
                 channels: int = 2, name: str = "omniforcing.mp4", hls: bool = True, hls_dirname: str = "hls",
                 crf: int = 20, preset: str = "veryfast", audio_bitrate: str = "128k", odd_size: str = "pad",
                 audio_wait_s: float = 2.0):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.fps, self.sample_rate, self.channels = float(fps), sample_rate, channels
        self.width, self.height = width, height
        self.crf, self.preset, self.odd_size, self.audio_wait_s = crf, preset, odd_size, audio_wait_s
        hls_dir = self.out_dir / hls_dirname if hls else None
        self.paths = LivePaths(self.out_dir / name, hls_dir, hls_dir / "index.m3u8" if hls_dir else None)
        if hls_dir:
            hls_dir.mkdir(parents=True, exist_ok=True)
        # video clock: timescale/frame_delta is exactly fps (24000/1000, 24000/1001, ...)
        rate = Fraction(self.fps).limit_denominator(1001)
        scale = 1000 if rate.numerator < 1000 else 1
        self.video_timescale, self.frame_delta = rate.numerator * scale, rate.denominator * scale
        self.encoded_rate = aac_rate(sample_rate) if sample_rate else None
        self._aac = _AacEncoder(sample_rate, self.encoded_rate, channels, audio_bitrate) if sample_rate else None
        if self._aac:  # a writer dropped without close() must not leave ffmpeg waiting on stdin forever
            weakref.finalize(self, _close_quietly, self._aac.proc.stdin)
        self._mp4 = open(self.paths.mp4, "wb")
        self._init: Optional[bytes] = None
        self._video_track: Optional[VideoTrack] = None
        self._frames = 0
        self._samples_in = 0
        self._packets_muxed = 0
        self._segments: list[tuple[Path, float]] = []
        self._last_runs: list[TrackRun] = []
        self._last_sequence = 0
        self._sequence = 0
        self._blocks = 0
        self._closed = False

    # -- public -------------------------------------------------------------------------------
    def write(self, frames: Any, audio: Any = None) -> BlockWritten:
        if self._closed:
            raise MediaError("LiveWriter is closed")
        video = self._frames_block(frames)
        if self._aac:
            self._aac.write(self._audio_block(audio, video.shape[0]))
        runs = [self._encode_video(video)]
        if self._init is None:
            self._write_init()
        if self._aac:
            # everything but the encoder's last few packets is due; wait (bounded) so fragments stay full
            due = (self._samples_in_encoded() + AAC_PRIMING) // AAC_FRAME - _ENCODER_LAG_PACKETS
            self._aac.wait_for(due, _SETTLE_S, self.audio_wait_s)
            runs.append(self._audio_run())
        fragment = self._append_fragment(runs)
        segment = self._write_segment(fragment, self._blocks, video.shape[0] / self.fps)
        self._last_runs, self._last_sequence = runs, self._sequence
        self._blocks += 1
        return BlockWritten(self._blocks - 1, self._frames, self._frames / self.fps, self.audio_seconds_muxed,
                            segment, len(fragment))

    def write_audio(self, audio: Any) -> None:
        """Audio that comes after the last video frame (a decoder's held-back tail): it is encoded
        now and muxed into the last fragment by `close()`."""
        if self._closed:
            raise MediaError("LiveWriter is closed")
        if self._aac:
            self._aac.write(self._audio_block(audio, 0))

    def close(self) -> LiveSummary:
        """Flush the audio encoder's tail into a last fragment, end the playlist."""
        if self._closed:
            return self.summary()
        self._closed = True
        if self._aac:
            self._aac.finish()
            tail = self._audio_run()
            if tail.samples and self._init is not None:
                self._append_fragment([tail])
                if self._segments:
                    # the last HLS segment gets the audio tail too, so every segment holds both tracks
                    video_run, audio_run = self._last_runs
                    merged = TrackRun(audio_run.track_id, audio_run.base_time, audio_run.samples + tail.samples)
                    _atomic_write(self._segments[-1][0], media_fragment(self._last_sequence, [video_run, merged]))
            if self._init is not None:
                self._write_init(audio_duration=self._samples_in_encoded())  # trim the AAC end padding
        self._mp4.close()
        if self.paths.playlist and self._segments:
            self._write_playlist(ended=True)
        return self.summary()

    def summary(self) -> LiveSummary:
        return LiveSummary(self.paths, self._blocks, self._frames,
                           self._frames / self.fps, self._samples_in, self.audio_seconds_muxed,
                           tuple(p for p, _ in self._segments))

    @property
    def audio_seconds_muxed(self) -> float:
        if not self._aac:
            return 0.0
        return max(0, self._packets_muxed * AAC_FRAME - AAC_PRIMING) / self.encoded_rate

    def __enter__(self) -> "LiveWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inputs ---------------------------------------------------------------------------------
    def _frames_block(self, frames: Any) -> np.ndarray:
        video = to_uint8_frames(frames)
        if video.shape[0] == 0:
            raise MediaError("a block needs at least one video frame")
        if video.shape[1:3] != (self.height, self.width):
            raise MediaError(f"block frames are {video.shape[2]}x{video.shape[1]}, "
                             f"writer is {self.width}x{self.height}")
        return even_frames(video, self.odd_size)[0]

    def _audio_block(self, audio: Any, n_frames: int) -> np.ndarray:
        if audio is None:
            # silence up to the video clock so later blocks stay in sync
            target = round((self._frames + n_frames) / self.fps * self.sample_rate)
            wave = np.zeros((self.channels, max(0, target - self._samples_in)), np.float32)
        else:
            wave = to_waveform(audio)
            if wave.shape[0] == 1 and self.channels > 1:
                wave = np.repeat(wave, self.channels, axis=0)
            if wave.shape[0] != self.channels:
                raise MediaError(f"audio block has {wave.shape[0]} channels, writer has {self.channels}")
        self._samples_in += wave.shape[1]
        return wave

    def _samples_in_encoded(self) -> int:
        return self._samples_in * self.encoded_rate // self.sample_rate

    # -- encoding -------------------------------------------------------------------------------
    def _encode_video(self, video: np.ndarray) -> TrackRun:
        n, h, w = video.shape[:3]
        es = run_ffmpeg(["-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
                         "-framerate", rate_string(self.fps), "-i", "pipe:0", "-c:v", "libx264",
                         "-preset", self.preset, "-crf", str(self.crf), "-pix_fmt", "yuv420p",
                         "-bf", "0",  # decode order == presentation order: no composition offsets
                         "-x264-params", "aud=1",  # a delimiter before each frame: how we split frames
                         "-f", "h264", "pipe:1"], input=video.tobytes()).stdout
        nals = split_annexb(es)
        if self._video_track is None:
            sps, pps = parameter_sets(nals)
            self._video_track = VideoTrack(w, h, self.video_timescale, sps, pps)
        units = access_units(nals)
        if len(units) != n:
            raise MediaError(f"x264 returned {len(units)} frames for {n}")
        samples = [Sample(avcc_sample(u, self._video_track), self.frame_delta, u.keyframe) for u in units]
        run = TrackRun(1, self._frames * self.frame_delta, samples)
        self._frames += n
        return run

    def _audio_run(self) -> TrackRun:
        new = self._aac.take(self._packets_muxed)
        run = TrackRun(2, self._packets_muxed * AAC_FRAME, [Sample(p, AAC_FRAME) for p in new])
        self._packets_muxed += len(new)
        return run

    # -- files ----------------------------------------------------------------------------------
    def _write_init(self, audio_duration: Optional[int] = None) -> None:
        """Init segment; at close it is rewritten in place (same size) with the exact audio length."""
        tracks = [self._video_track]
        if self._aac:
            tracks.append(AudioTrack(self.encoded_rate, self.channels, AAC_PRIMING))
        scale = self.encoded_rate or self.video_timescale
        init = init_segment(tracks, movie_timescale=scale, audio_duration=audio_duration)
        if self._init is None:
            self._mp4.write(init)
        else:
            assert len(init) == len(self._init)
            self._mp4.seek(0)
            self._mp4.write(init)
            self._mp4.seek(0, os.SEEK_END)
        self._init = init
        if self.paths.hls_dir:
            _atomic_write(self.paths.hls_dir / "init.mp4", init)

    def _append_fragment(self, runs: list[TrackRun]) -> bytes:
        self._sequence += 1
        fragment = media_fragment(self._sequence, runs)
        self._mp4.write(fragment)
        self._mp4.flush()  # in the OS page cache: survives our process being killed
        return fragment

    def _write_segment(self, fragment: bytes, index: int, seconds: float) -> Optional[Path]:
        if not self.paths.hls_dir:
            return None
        path = self.paths.hls_dir / f"seg_{index:05d}.m4s"
        _atomic_write(path, fragment)
        self._segments.append((path, seconds))
        self._write_playlist(ended=False)
        return path

    def _write_playlist(self, ended: bool) -> None:
        target = max(1, math.ceil(max(d for _, d in self._segments)))
        lines = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-TARGETDURATION:{target}", "#EXT-X-MEDIA-SEQUENCE:0",
                 "#EXT-X-PLAYLIST-TYPE:EVENT", "#EXT-X-INDEPENDENT-SEGMENTS", "#EXT-X-START:TIME-OFFSET=0",
                 '#EXT-X-MAP:URI="init.mp4"']
        for path, seconds in self._segments:
            lines += [f"#EXTINF:{seconds:.6f},", path.name]
        if ended:
            lines.append("#EXT-X-ENDLIST")
        _atomic_write(self.paths.playlist, ("\n".join(lines) + "\n").encode())


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers (a browser polling the playlist) see the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_playlist(path: PathLike) -> "Playlist":
    """Parse our HLS media playlist (segment names and durations, ended or still live)."""
    text = Path(path).read_text()
    segs, dur = [], None
    for line in text.splitlines():
        if line.startswith("#EXTINF:"):
            dur = float(line[8:].split(",")[0])
        elif line and not line.startswith("#") and dur is not None:
            segs.append((line, dur))
            dur = None
    return Playlist(tuple(s for s, _ in segs), tuple(d for _, d in segs), "#EXT-X-ENDLIST" in text)


@dataclass(frozen=True)
class Playlist:
    segments: tuple[str, ...]
    durations: tuple[float, ...]
    ended: bool

    @property
    def seconds(self) -> float:
        return sum(self.durations)


__all__ = ["LivePaths", "BlockWritten", "LiveSummary", "LiveWriter", "Playlist", "read_playlist", "AAC_PRIMING"]
