"""Live writers: a growing fragmented MP4 and an HLS playlist, fed one generated block at a time.

Design (why not one ffmpeg process with two input pipes): ffmpeg reads its inputs in timestamp
order, so a big video write can block while ffmpeg waits for audio on the other pipe (deadlock
without careful threading), its fragmenting muxer holds the newest fragment until the next
keyframe, and after a kill the last block is lost. Instead:

* video: one short ffmpeg (x264) run per block. Every block is a closed GOP starting with an IDR,
  i.e. a keyframe per block, and the run ends before `write()` returns.
* audio: ONE long-lived ffmpeg AAC encoder (raw PCM in, ADTS out), so the AAC stream is continuous
  across blocks (no per-block priming, no seams). A reader thread drains its stdout, so our stdin
  writes can never block on a full output pipe; another keeps the last lines of its stderr.
* muxing: our own fMP4 writer (`fmp4.py`). After each block we append one moof+mdat fragment to
  the MP4 and write the same bytes as an HLS segment, then the playlist.

One clock: video frame n is at n/fps, audio sample m at m/sample_rate, both from t=0. The AAC
encoder's 1024 priming samples are hidden by an edit list in the init segment, so A/V sync does
not depend on block sizes. The AAC encoder holds back a few packets (measured 3-6, i.e. 0.1-0.25 s at
24 kHz: it cannot code a frame before it has the next one), so a fragment's audio may end slightly before
its video; the rest rides in the next fragment (or the final one on close), and a killed stream loses only
that much audio.

`align_av=True` (issue 11 item 1) cuts every fragment - hence every HLS segment - at one time instead: the
frames whose time the packets out of the encoder do not cover yet are kept back (as pixels, at most
`_max_held` of them) and written with the next block, x264 encoding them again so that every fragment still
starts on a keyframe; packets past the cut wait too. Each fragment's audio then ends 0-1023 samples after
its video. The cost: those frames (~3-4 per block at 24 fps) reach the disk one `write()` later, and a
killed stream (SIGKILL) loses them - what is on disk is aligned all the same. A caller handing less audio
than video is not waited for (frames are kept back only while the audio handed in covers them).

Stops (issue 14). Whatever ends a stream, what is on disk is valid:

* Every fragment is appended with its `moof` box typed `free` and committed by rewriting those 4
  bytes to `moof` once the whole fragment is written: a process killed mid-write (SIGKILL, power)
  leaves a torn tail that readers skip, never a fragment with missing data. HLS segments and the
  playlist are written to a temporary name and renamed.
* `close()` (idempotent) ends the MP4 on a whole fragment, muxes the encoder's held-back audio (align_av:
  with the frames kept back, in one last fragment and segment),
  trims the audio to the length given to completed writes (A/V equal within one AAC frame) and
  ends the playlist (#EXT-X-ENDLIST). A fatal error in `write()` - the encoder dying (its stderr
  tail is in the message), disk full, NaN/Inf output, x264 failing - does the same and then raises
  one MediaError. A dead encoder's unflushed audio is re-encoded from the PCM kept since its last
  packet, so even then audio and video end together.
* ffmpeg children run in their own process group: a terminal's Ctrl-C reaches only us. Ctrl-C/SIGTERM
  (when Python handles them) wait until the block being written is whole; a second one does not wait.
* Nothing of an earlier run is destroyed before this run has a block on disk: the MP4 is written as
  `.NAME.part` and renamed over NAME on the first fragment; stale segments go at the same moment.
* A small reserve file (`.NAME.reserve`, 1 MiB) is given back when the disk fills up, so the stream
  can still be ended properly.
* Memory is bounded: AAC packets are handed over and forgotten, PCM is kept only back to the
  encoder's last packet, align_av keeps back at most `_max_held` frames and _MAX_HELD_PACKETS packets,
  and `hls_window` keeps a rolling playlist (older segment files deleted).
"""
from __future__ import annotations

import atexit
import errno
import math
import numbers
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

import numpy as np

from .fmp4 import (AAC_FRAME, AudioTrack, Sample, TrackRun, VideoTrack, access_units, audio_specific_config,
                   avcc_sample, init_segment, media_fragment, parameter_sets, split_adts, split_annexb)
from .media import (MediaError, NonFiniteError, PathLike, aac_rate, child_process_options, even_frames, ffmpeg_exe,
                    rate_string, run_ffmpeg, to_uint8_frames, to_waveform)

AAC_PRIMING = 1024  # ffmpeg's native AAC encoder delay (samples); checked by the A/V offset test
_ENCODER_LAG_PACKETS = 8  # packets the encoder may legitimately still hold after a write (measured 3-5)
_SETTLE_S = 0.03  # after that, keep taking packets until the encoder is quiet this long
_MAX_HELD_PACKETS = 16  # align_av: AAC packets kept past the video cut at most (audio handed ahead of its video)
RESERVE_BYTES = 1 << 20  # disk space held back for a stream's last writes (audio tail, ended playlist)
_STDERR_LINES = 20  # the encoder's stderr lines kept for error messages
_PAGE = 4096
_FREE8 = b"\x00\x00\x00\x08free"  # an empty `free` box: keeps a commit's 4 bytes inside one page
_SEGMENT_RE = re.compile(r"seg_\d{5,}\.m4s(\.tmp)?")
_BITRATE_RE = re.compile(r"\d+(\.\d+)?[kKmM]?")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")


def segment_name(index: int) -> str:
    return f"seg_{index:05d}.m4s"


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
    audio_samples: int  # given to completed writes, at the input rate
    audio_seconds: float
    segment_range: range = range(0)  # indexes of the segments the playlist lists (all, or the last hls_window)
    stopped: Optional[str] = None  # the error that ended the stream early; None if closed normally or still open

    @property
    def segments(self) -> tuple[Path, ...]:
        """The playlist's segment files (O(segments): prefer `last_segment` per block)."""
        if self.paths.hls_dir is None:
            return ()
        return tuple(self.paths.hls_dir / segment_name(i) for i in self.segment_range)

    @property
    def last_segment(self) -> Optional[Path]:
        if self.paths.hls_dir is None or not self.segment_range:
            return None
        return self.paths.hls_dir / segment_name(self.segment_range[-1])


# ---------------------------------------------------------------------------------------------
# signals: a block is written whole


@contextmanager
def _signals_held() -> Iterator[None]:
    """Python-handled SIGINT/SIGTERM (KeyboardInterrupt, the CLI's SIGTERM handler) are delivered when
    the block is on disk, not in the middle of it. A second signal is delivered at once (a hung ffmpeg
    must not make us unkillable). Only in the main thread, where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: h for s in (signal.SIGINT, signal.SIGTERM) if callable(h := signal.getsignal(s))}
    held: list[int] = []

    def restore() -> None:
        for s, h in old.items():
            signal.signal(s, h)

    def hold(signum, frame) -> None:
        held.append(signum)
        if len(held) == 2:
            restore()
            old[signum](signum, frame)

    for s in old:
        signal.signal(s, hold)
    try:
        yield
    finally:
        restore()
        if len(held) == 1:
            old[held[0]](held[0], None)


# ---------------------------------------------------------------------------------------------
# the AAC encoder


class _AacEncoder:
    """Long-lived ffmpeg: f32le PCM on stdin -> ADTS on stdout, drained by a thread.

    Packets are handed over by `take()` and forgotten; PCM is kept (`history`) back to the first
    sample the encoder has not yet returned in a packet, so a dead encoder's tail can be re-encoded.
    At `-loglevel error` anything on stderr is an error: ffmpeg reports a failed encode there and
    then keeps reading silently, so a line on stderr counts as a dead encoder."""

    def __init__(self, in_rate: int, out_rate: int, channels: int, bitrate: str):
        self.in_rate, self.out_rate, self.channels, self.bitrate = in_rate, out_rate, channels, bitrate
        try:
            self.proc = subprocess.Popen(
                [ffmpeg_exe(), "-hide_banner", "-nostats", "-loglevel", "error", "-f", "f32le", "-ar", str(in_rate),
                 "-ac", str(channels), "-i", "pipe:0", "-c:a", "aac", "-b:a", bitrate, "-ar", str(out_rate),
                 "-f", "adts", "-flush_packets", "1", "pipe:1"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **child_process_options())
        except OSError as e:
            raise MediaError(f"cannot start ffmpeg for the AAC encoder ({e.strerror}): {ffmpeg_exe()}") from None
        self.emitted = 0  # packets out so far
        self.fed = 0  # samples in so far (input rate)
        self.history: deque[tuple[int, np.ndarray]] = deque()  # (first sample, [T, C]) since the last packet
        self._new: list[bytes] = []
        self._pending = b""
        self._stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        self._read_error: Optional[str] = None
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, name="omniforcing-aac-reader", daemon=True)
        self._err_reader = threading.Thread(target=self._read_stderr, name="omniforcing-aac-stderr", daemon=True)
        self._reader.start()
        self._err_reader.start()

    def _read(self) -> None:
        try:
            while True:
                data = self.proc.stdout.read1(1 << 16)
                if not data:
                    break
                frames, self._pending = split_adts(self._pending + data)
                with self._cond:
                    self._new.extend(frames)
                    self.emitted += len(frames)
                    self._cond.notify_all()
        except (OSError, ValueError) as e:  # a closed pipe, lost ADTS sync
            self._read_error = str(e)
        finally:
            with self._cond:
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        try:
            for line in self.proc.stderr:
                text = line.decode(errors="replace").strip()
                if text:
                    with self._cond:
                        self._stderr.append(text)
                        self._cond.notify_all()
        except (OSError, ValueError):
            pass

    @property
    def failed(self) -> bool:
        """The process is gone (stdout ended) or reported an error, before `finish()`."""
        return not self._reader.is_alive() or bool(self._stderr) or self._read_error is not None

    def write(self, pcm: np.ndarray, keep: bool = True) -> None:
        """pcm [C, T] float32; blocks only while ffmpeg consumes it (the reader keeps it moving)."""
        interleaved = pcm.T.astype(np.float32, order="C")  # a copy: the caller may reuse its buffer
        if keep:
            self.history.append((self.fed, interleaved))
        self.fed += pcm.shape[1]
        if not interleaved.size:
            return
        try:
            self.proc.stdin.write(memoryview(interleaved).cast("B"))
            self.proc.stdin.flush()
        except (OSError, ValueError):  # BrokenPipeError: the process is gone
            raise MediaError(self.death()) from None

    def wait_for(self, count: int, settle: float, timeout: float) -> None:
        """Until `count` packets are out, then until none arrived for `settle` s; never past `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._reader.is_alive() and not self._stderr:
                have, now = self.emitted, time.monotonic()
                if now >= deadline:
                    break
                if have >= count:
                    self._cond.wait(min(settle, deadline - now))
                    if self.emitted == have:
                        break
                else:
                    self._cond.wait(deadline - now)

    def take(self) -> list[bytes]:
        """The packets that came out since the last call (the reader thread may be appending)."""
        with self._cond:
            new, self._new = self._new, []
        return new

    def trim_history(self, keep_from: int) -> None:
        """Forget PCM before input sample `keep_from` (whole chunks only)."""
        while len(self.history) > 1 and self.history[1][0] <= keep_from:
            self.history.popleft()
        if self.history and self.history[0][0] + self.history[0][1].shape[0] <= keep_from:
            self.history.popleft()

    def pcm(self, start: int, stop: int) -> Optional[np.ndarray]:
        """Input samples [start, stop) from the history; None if it no longer reaches back to `start`."""
        if not self.history or self.history[0][0] > start:
            return None if start < stop else np.zeros((self.channels, 0), np.float32)
        parts = [c for _, c in self.history]
        whole = np.concatenate(parts, axis=0) if len(parts) > 1 else parts[0]
        first = self.history[0][0]
        return whole[start - first:stop - first].T

    def death(self) -> str:
        """What to tell the user about a dead encoder: how it ended, and its own last words."""
        try:
            rc = self.proc.wait(2 if self._stderr else 5)
        except subprocess.TimeoutExpired:
            rc = None
        self._err_reader.join(2)
        if rc is None:
            how = "stopped encoding"
        elif rc < 0:
            try:
                how = f"killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"killed by signal {-rc}"
        else:
            how = f"exit code {rc}"
        with self._cond:
            tail = " | ".join(list(self._stderr)[-5:])
        if not tail and self._read_error:
            tail = self._read_error
        return (f"the AAC encoder process died (ffmpeg, pid {self.proc.pid}, {how})"
                + (f": {tail}" if tail else ", no error output"))

    def finish(self, timeout: float = 30.0) -> bool:
        """End of input: wait for the last packets. True if the encoder ended cleanly."""
        try:
            if self.proc.stdin and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except OSError:
            pass
        self._reader.join(timeout)
        try:
            rc = self.proc.wait(max(1.0, timeout / 3))
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        self._err_reader.join(2)
        return rc == 0 and not self._stderr and self._read_error is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def _reencode(in_rate: int, out_rate: int, channels: int, bitrate: str, pcm: np.ndarray) -> list[bytes]:
    """A fresh encoder's packets for `pcm` (priming packet included); [] if that fails too."""
    enc = _AacEncoder(in_rate, out_rate, channels, bitrate)
    try:
        enc.write(pcm, keep=False)
    except MediaError:
        enc.kill()
        return []
    ok = enc.finish()
    packets = enc.take()
    return packets if ok else []


# ---------------------------------------------------------------------------------------------
# files


def _write_all(f, data) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = f.write(view)
        if not n:
            raise OSError(errno.EIO, "write made no progress")
        view = view[n:]


def _pwrite(f, data: bytes, offset: int) -> None:
    """Overwrite in place without moving the append position."""
    if hasattr(os, "pwrite"):
        fd = f.fileno()
        while data:
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n
    else:  # Windows
        pos = f.tell()
        f.seek(offset)
        _write_all(f, data)
        f.seek(pos)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers (a browser polling the playlist) see the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb", buffering=0) as f:
            _write_all(f, data)
        os.replace(tmp, path)
    except BaseException:
        try:
            _remove(tmp)
        except OSError:
            pass
        raise


def _close_quietly(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


_OPEN: "weakref.WeakSet[LiveWriter]" = weakref.WeakSet()


@atexit.register
def _close_open_writers() -> None:
    """A script that ends (or dies of an exception) without close(): its streams still get ended."""
    for w in list(_OPEN):
        try:
            w.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _positive_int(value: Any, what: str) -> int:
    try:
        ok = int(value) == value and int(value) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise MediaError(f"{what} must be a positive whole number, got {value!r}")
    return int(value)


def _check_arguments(fps, sample_rate, width, height, channels, name, hls_dirname, hls_window, crf, preset,
                     audio_bitrate, audio_wait_s, align_av) -> None:
    """Every argument, before any file or process exists."""
    try:
        ok = math.isfinite(float(fps)) and float(fps) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise MediaError(f"fps must be a positive number, got {fps!r}")
    _positive_int(width, "width")
    _positive_int(height, "height")
    if sample_rate is not None:
        _positive_int(sample_rate, "sample_rate")
        _positive_int(channels, "channels")
        try:
            audio_specific_config(aac_rate(int(sample_rate)), int(channels))
        except ValueError as e:
            raise MediaError(str(e)) from None
        if not _BITRATE_RE.fullmatch(str(audio_bitrate)):
            raise MediaError(f"audio_bitrate must look like '128k', got {audio_bitrate!r}")
    for what, n in (("name", name), ("hls_dirname", hls_dirname)):
        if not isinstance(n, str) or not n or n in (".", "..") or Path(n).name != n or "\\" in n:
            raise MediaError(f"{what}={n!r} must be a plain file name (no folders); the folder is out_dir")
    if isinstance(hls_window, bool) or not isinstance(hls_window, numbers.Integral) or hls_window < 0:
        raise MediaError(f"hls_window must be 0 (keep every segment) or a number of segments, got {hls_window!r}")
    if isinstance(crf, bool) or not isinstance(crf, numbers.Real) or not 0 <= crf <= 51:
        raise MediaError(f"crf must be in 0..51, got {crf!r}")
    if preset not in X264_PRESETS:
        raise MediaError(f"preset must be one of {', '.join(X264_PRESETS)}, got {preset!r}")
    if not isinstance(audio_wait_s, numbers.Real) or not audio_wait_s >= 0:
        raise MediaError(f"audio_wait_s must be a number of seconds >= 0, got {audio_wait_s!r}")
    if not isinstance(align_av, bool):
        raise MediaError(f"align_av must be True or False, got {align_av!r}")


def _check_output_paths(paths: LivePaths, part: Path) -> None:
    """Folders that are files and files that are folders, named with the fix, before anything is written."""
    out = paths.mp4.parent
    try:
        for folder in (out, *out.parents):
            if folder.exists():
                if not folder.is_dir():
                    raise MediaError(f"{folder} is a file, not a folder: choose another output folder (--out)")
                break
        for path in (paths.mp4, part, paths.playlist):
            if path is not None and path.is_dir():
                raise MediaError(f"{path} is a folder, where the stream writes a file: remove or rename it, "
                                 f"or choose another name or output folder (--out)")
        if paths.hls_dir is not None and paths.hls_dir.exists() and not paths.hls_dir.is_dir():
            raise MediaError(f"{paths.hls_dir} is a file, where the HLS folder goes: remove or rename it, "
                             f"or choose another output folder (--out)")
    except PermissionError as e:
        raise MediaError(f"cannot look into {e.filename or out} ({e.strerror}): choose an output folder "
                         f"you can write to (--out)") from None


class LiveWriter:
    """Block-by-block fMP4 + HLS writer. `write(frames, audio)` per block, `close()` at the end.

    frames: [N, H, W, 3] uint8 or float in [0, 1]; audio: [C, T] (or [T]) float at `sample_rate`,
    or None (silence up to the video clock). sample_rate=None writes video only.

    hls_window: 0 (default) lists every segment (an EVENT playlist); N > 0 keeps a rolling playlist of
    the last N segments (#EXT-X-MEDIA-SEQUENCE advances); a segment's file is deleted one window
    after it left the playlist (a client may still hold the previous playlist). The MP4 keeps all.

    align_av (default on): cut every fragment / HLS segment where its audio ends (within one AAC frame)
    by keeping back the few frames the AAC encoder has not caught up with; they are written by the next
    `write()` or by `close()`, so a player never holds picture without its sound. Off: every frame is on
    disk when its `write()` returns and each call makes one segment, but a segment's audio ends 2-4 AAC
    frames before its video. `BlockWritten` and `summary()` count what is on disk.

    Errors are MediaError. Bad arguments and output paths are refused before anything is written.
    In `write()`, a bad block (wrong size or channel count) is refused and the stream goes on; a fatal
    error (NaN/Inf output, the encoder dying, disk full, x264 failing) ends the stream at its last
    whole block - files closed and valid, as `close()` leaves them - and is then raised.
    """

    def __init__(self, out_dir: PathLike, fps: float, sample_rate: Optional[int], width: int, height: int, *,
                 channels: int = 2, name: str = "omniforcing.mp4", hls: bool = True, hls_dirname: str = "hls",
                 hls_window: int = 0, crf: int = 20, preset: str = "veryfast", audio_bitrate: str = "128k",
                 odd_size: str = "pad", audio_wait_s: float = 2.0, align_av: bool = True):
        _check_arguments(fps, sample_rate, width, height, channels, name, hls_dirname, hls_window, crf, preset,
                         audio_bitrate, audio_wait_s, align_av)
        self.out_dir = Path(out_dir)
        self.fps, self.sample_rate, self.channels = float(fps), sample_rate and int(sample_rate), int(channels)
        self.width, self.height = int(width), int(height)
        self.crf, self.preset, self.odd_size, self.audio_wait_s = crf, preset, odd_size, audio_wait_s
        self.audio_bitrate, self.hls_window = audio_bitrate, int(hls_window)
        self.align_av = align_av and bool(sample_rate)
        hls_dir = self.out_dir / hls_dirname if hls else None
        self.paths = LivePaths(self.out_dir / name, hls_dir, hls_dir / "index.m3u8" if hls_dir else None)
        self._part = self.out_dir / f".{name}.part"  # the MP4 until its first fragment is whole
        self._reserve = self.out_dir / f".{name}.reserve"
        _check_output_paths(self.paths, self._part)
        # video clock: timescale/frame_delta is exactly fps (24000/1000, 24000/1001, ...)
        rate = Fraction(self.fps).limit_denominator(1001)
        scale = 1000 if rate.numerator < 1000 else 1
        self.video_timescale, self.frame_delta = rate.numerator * scale, rate.denominator * scale
        self.encoded_rate = aac_rate(self.sample_rate) if self.sample_rate else None
        # align_av: frames held back at most - the span of the packets an encoder may hold, and one more
        self._max_held = (-(-(_ENCODER_LAG_PACKETS + 2) * AAC_FRAME * self.video_timescale
                            // (self.frame_delta * self.encoded_rate)) + 1) if self.encoded_rate else 0
        self._writing: Path = self.paths.mp4  # the file being written, for error messages
        for folder in (self.out_dir, hls_dir):
            if folder is None:
                continue
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise MediaError(f"cannot create the folder {folder} ({e.strerror}): the output folder must be "
                                 f"writable; choose another one (--out)") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise MediaError(f"{folder} is not writable: choose another output folder (--out)")
        try:
            self._mp4 = open(self._part, "wb", buffering=0)
        except OSError as e:
            raise MediaError(f"cannot write in {self.out_dir} ({e.strerror}): the output folder must be "
                             f"writable; choose another one (--out)") from None
        self._make_reserve()
        self._aac: Optional[_AacEncoder] = None
        if self.sample_rate:
            try:
                self._aac = _AacEncoder(self.sample_rate, self.encoded_rate, self.channels, audio_bitrate)
            except BaseException:
                _close_quietly(self._mp4)
                _remove(self._part)
                _remove(self._reserve)
                raise
            # a writer dropped without close() must not leave ffmpeg waiting on stdin forever
            weakref.finalize(self, _close_quietly, self._aac.proc.stdin)
        self._init: Optional[bytes] = None
        self._video_track: Optional[VideoTrack] = None
        self._committed = 0  # MP4 bytes that are whole boxes
        self._published = False  # the .part file renamed to its final name
        self._sequence = 0  # fragments in the MP4
        self._frames = 0  # in the MP4
        self._held: Optional[np.ndarray] = None  # align_av: frames of completed writes not yet covered by audio
        self._samples_in = 0  # given to completed write()/write_audio() calls
        self._packets_muxed = 0
        self._audio_pending: list[bytes] = []  # taken from the encoder, not yet in a fragment
        self._last_runs: list[TrackRun] = []  # the last block's fragment (its segment gets the audio tail)
        self._block_sequence = 0
        self._last_seconds = 0.0
        self._hls_ready = False  # init.mp4 written for this stream
        self._blocks = 0
        self._seg_first = 0  # first segment in the playlist (#EXT-X-MEDIA-SEQUENCE)
        self._seg_next = 0
        self._seg_sequence = 0  # the MP4 fragment the last segment holds
        self._lines: deque[str] = deque(maxlen=self.hls_window or None)  # the playlist's segment entries
        self._target = 1
        self._closed = False
        self._stopped: Optional[str] = None
        self._audio_lost = 0.0  # s of audio a dead encoder took with it (when re-encoding failed too)
        _OPEN.add(self)

    # -- public -------------------------------------------------------------------------------
    def write(self, frames: Any, audio: Any = None) -> BlockWritten:
        self._check_open()
        try:
            video = self._frames_block(frames)
            wave = self._audio_block(audio, video.shape[0]) if self._aac else None
        except NonFiniteError as e:
            with _signals_held():
                self._fail(e)
        with _signals_held():
            try:
                segment, size = self._write_block(video, wave)
            except OSError as e:
                self._fail(self._disk_error(e))
            except MediaError as e:
                self._fail(e)
        return BlockWritten(self._blocks - 1, self._frames, self._frames / self.fps, self.audio_seconds_muxed,
                            segment, size)

    def write_audio(self, audio: Any) -> None:
        """Audio that comes after the last video frame (a decoder's held-back tail): it is encoded
        now and muxed into the last fragment by `close()`."""
        self._check_open()
        if not self._aac:
            return
        try:
            wave = self._audio_block(audio, 0)
        except NonFiniteError as e:
            with _signals_held():
                self._fail(e)
        with _signals_held():
            try:
                self._aac.write(wave)
            except MediaError as e:
                self._fail(e)
            self._samples_in += wave.shape[1]

    def close(self) -> LiveSummary:
        """Flush the audio encoder's tail into a last fragment, end the MP4 on a whole fragment and
        the playlist with #EXT-X-ENDLIST. Idempotent. Raises MediaError only if the files could not
        be finished (e.g. the disk is full): they are still valid up to the last whole block."""
        if not self._closed:
            with _signals_held():
                self._finish()
        return self.summary()

    def summary(self) -> LiveSummary:
        return LiveSummary(self.paths, self._blocks, self._frames, self._frames / self.fps, self._samples_in,
                           self.audio_seconds_muxed, range(self._seg_first, self._seg_next), self._stopped)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def _frames_in(self) -> int:
        """Frames given to completed writes: in the MP4, or held back for their audio (align_av)."""
        return self._frames + (0 if self._held is None else self._held.shape[0])

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
    def _check_open(self) -> None:
        if self._closed:
            why = f" (the stream was ended by an error: {self._stopped})" if self._stopped else ""
            raise MediaError(f"LiveWriter is closed{why}")

    def _frames_block(self, frames: Any) -> np.ndarray:
        video = to_uint8_frames(frames, what="generated frames")
        if video.shape[0] == 0:
            raise MediaError("a block needs at least one video frame")
        if video.shape[1:3] != (self.height, self.width):
            raise MediaError(f"block frames are {video.shape[2]}x{video.shape[1]}, "
                             f"writer is {self.width}x{self.height}")
        return even_frames(video, self.odd_size)[0]

    def _audio_block(self, audio: Any, n_frames: int) -> np.ndarray:
        if audio is None:
            # silence up to the video clock so later blocks stay in sync
            target = round((self._frames_in + n_frames) / self.fps * self.sample_rate)
            return np.zeros((self.channels, max(0, target - self._samples_in)), np.float32)
        wave = to_waveform(audio, what="generated audio")
        if wave.shape[0] == 1 and self.channels > 1:
            wave = np.repeat(wave, self.channels, axis=0)
        if wave.shape[0] != self.channels:
            raise MediaError(f"audio block has {wave.shape[0]} channels, writer has {self.channels}")
        return wave

    # -- one block ------------------------------------------------------------------------------
    def _write_block(self, video: np.ndarray, wave: Optional[np.ndarray]) -> tuple[Optional[Path], int]:
        """Encode, then append: counters move only once the fragment is whole in the MP4.
        align_av: the fragment ends where its audio ends (`_cut`); later frames wait for the next one."""
        if self._aac:
            self._aac.write(wave)
        parts = [video] if self._held is None else [self._held, video]
        total = sum(p.shape[0] for p in parts)
        run = self._encode_video(parts)  # while the AAC encoder works
        if self._aac:
            # everything but the encoder's last few packets is due; wait (bounded) so fragments stay full
            due = (self._aac.fed * self.encoded_rate // self.sample_rate + AAC_PRIMING) // AAC_FRAME \
                - _ENCODER_LAG_PACKETS
            self._aac.wait_for(due, _SETTLE_S, self.audio_wait_s)
            if self._aac.failed:
                raise MediaError(self._aac.death())
            self._audio_pending.extend(self._aac.take())
        samples_in = self._samples_in + (wave.shape[1] if self._aac else 0)
        frames, packets = self._cut(total, samples_in)
        if not frames:  # every frame waits for its audio: no fragment this time
            self._keep(parts, total, samples_in)
            return None, 0
        # no B-frames: the first access units alone decode; the frames kept are encoded again, with the next
        # block, so that every fragment starts on a keyframe
        del run.samples[frames:]
        return self._commit([run], packets, frames / self.fps,
                            lambda: self._keep(parts, total - frames, samples_in))

    def _keep(self, parts: list[np.ndarray], count: int, samples_in: int) -> None:
        """The call is complete: its audio counts, and the last `count` frames of `parts` are kept back (a
        copy: the caller may reuse its buffer, and a view would keep the whole block alive)."""
        self._samples_in = samples_in
        kept = []
        for p in reversed(parts):
            if count <= 0:
                break
            kept.append(p[max(0, p.shape[0] - count):])
            count -= kept[-1].shape[0]
        self._held = np.concatenate(kept[::-1]) if kept else None

    def _cut(self, frames: int, samples_in: int) -> tuple[int, int]:
        """How many of `frames` (the next frames of the stream) and of the pending AAC packets go into the
        next fragment. Without align_av: all of them. With it: the frames whose time the packets out of the
        encoder cover, and the packets up to the first one that reaches past the last of those frames, so
        the fragment's audio ends 0-1023 samples after its video. Frames are kept back only while the audio
        handed in covers them (a caller giving less audio than video is not waited for) and at most
        `_max_held`; packets at most _MAX_HELD_PACKETS (a caller giving more audio than video)."""
        pending = len(self._audio_pending)
        if not self.align_av:
            return frames, pending
        enc, scale, delta = self.encoded_rate, self.video_timescale, self.frame_delta
        end = (self._frames + frames) * delta * enc  # the video's end, in encoded samples x timescale
        slack = max(AAC_FRAME * scale, delta * enc)
        if end > samples_in * enc * scale // self.sample_rate + slack:
            cut = frames  # the audio handed in stops short of the video: it cannot be waited for
        else:
            out = max(0, self._packets_muxed + pending - 1) * AAC_FRAME  # presentation end of the audio out
            cut = min(frames, max(0, out * scale // (delta * enc) - self._frames, frames - self._max_held))
        video_end = -(-(self._frames + cut) * delta * enc // scale)  # encoded samples, rounded up
        packets = -(-video_end // AAC_FRAME) + 1 - self._packets_muxed  # audio end (P - 1) * 1024 >= video end
        return cut, min(pending, max(packets, pending - _MAX_HELD_PACKETS, 0))

    def _commit(self, runs: list[TrackRun], packets: int, seconds: float, complete,
                playlist: bool = True) -> tuple[Optional[Path], int]:
        """One fragment: `runs` (video) and the first `packets` pending AAC packets, appended to the MP4
        (the init segment first); `complete()` once it is whole there; then its HLS segment."""
        if self._aac:
            runs = runs + [TrackRun(2, self._packets_muxed * AAC_FRAME,
                                    [Sample(p, AAC_FRAME) for p in self._audio_pending[:packets]])]
        fragment = media_fragment(self._sequence + 1, runs)
        first = self._init is None
        if first:
            self._init = self._make_init()
            self._append(self._init, commit=False)
        self._append(fragment, commit=True)
        # the fragment is whole in the MP4: count it
        self._sequence += 1
        self._frames += len(runs[0].samples)
        if self._aac:
            self._packets_muxed += packets
            del self._audio_pending[:packets]
            # PCM is needed back to the last packet only (to re-encode a dead encoder's tail)
            self._aac.trim_history(max(0, self._packets_muxed - 1) * AAC_FRAME * self.sample_rate
                                   // self.encoded_rate)
        complete()
        self._blocks += 1
        self._last_runs, self._block_sequence, self._last_seconds = runs, self._sequence, seconds
        if first:
            self._publish()
        return self._write_segment(fragment, seconds, playlist), len(fragment)

    def _encode_video(self, parts: list[np.ndarray]) -> TrackRun:
        """The frames of `parts`, in order, as one closed GOP (x264 reads them as one input)."""
        n, (h, w) = sum(p.shape[0] for p in parts), parts[0].shape[1:3]
        es = run_ffmpeg(["-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}",
                         "-framerate", rate_string(self.fps), "-i", "pipe:0", "-c:v", "libx264",
                         "-preset", self.preset, "-crf", str(self.crf), "-pix_fmt", "yuv420p",
                         "-bf", "0",  # decode order == presentation order: no composition offsets
                         "-x264-params", "aud=1",  # a delimiter before each frame: how we split frames
                         "-f", "h264", "pipe:1"],
                        input=b"".join(memoryview(np.ascontiguousarray(p)).cast("B") for p in parts)).stdout
        nals = split_annexb(es)
        if self._video_track is None:
            sps, pps = parameter_sets(nals)
            self._video_track = VideoTrack(w, h, self.video_timescale, sps, pps)
        units = access_units(nals)
        if len(units) != n:
            raise MediaError(f"x264 returned {len(units)} frames for {n}")
        samples = [Sample(avcc_sample(u, self._video_track), self.frame_delta, u.keyframe) for u in units]
        return TrackRun(1, self._frames * self.frame_delta, samples)

    # -- the end --------------------------------------------------------------------------------
    def _fail(self, err: MediaError) -> NoReturn:
        """A fatal error: end the stream at its last whole block, then raise one MediaError."""
        self._stopped = str(err)
        problem = ""
        try:
            self._finish()
        except MediaError as e:
            problem = f"; while closing: {e}"
        if self._sequence:
            where = (f"the stream was ended at {self._frames / self.fps:.2f} s ({self._blocks} blocks); "
                     f"its files are closed and valid up to there")
        else:
            where = "nothing of this stream was written (an earlier run's files are left as they were)"
        raise MediaError(f"{err}; {where}{problem}") from None

    def _finish(self) -> None:
        """Everything `close()` promises, each step on its own (one failing does not skip the others)."""
        self._closed = True
        _OPEN.discard(self)
        errors: list[str] = []

        def step(fn, *args):
            try:
                return fn(*args)
            except OSError as e:
                errors.append(str(self._disk_error(e)))
            except (MediaError, ValueError) as e:  # ValueError: a file already closed by a failed step
                errors.append(str(e))

        step(_remove, self._reserve)  # its space is for what follows
        self._writing = self.paths.mp4
        step(self._drop_torn_tail)
        tail: list[bytes] = []
        if self._aac and not self._sequence and self._held is None:
            self._aac.finish()  # nothing of this stream is on disk: no audio to add
        elif self._aac:
            tail = step(self._audio_tail) or []
            if self._audio_lost:
                errors.append(f"the last {self._audio_lost:.2f} s of audio could not be encoded again "
                              f"after the encoder died: the audio ends that much before the video")
            if self._held is not None:
                # align_av: the frames kept back and the audio tail make one last fragment and segment,
                # after the segment of the last block if that one could not be written (disk full)
                step(self._finish_hls, [])
                if step(self._flush_held, tail) is None:
                    step(self._drop_torn_tail)
                tail = []
            elif tail and step(self._append_audio_tail, tail) is None:
                step(self._drop_torn_tail)
            if self._init is not None:
                step(self._rewrite_init)
        step(self._finish_hls, tail)
        _close_quietly(self._mp4)
        if not self._published:
            if self._sequence:
                step(os.replace, self._part, self.paths.mp4)
            else:
                step(_remove, self._part)  # nothing of this run: an earlier run's file stays
        if self.paths.playlist and self._seg_next:
            step(self._end_playlist)
        if errors:
            raise MediaError("; ".join(dict.fromkeys(errors)))

    def _audio_tail(self) -> list[bytes]:
        """The packets still due for the audio of completed calls (and no more: A/V end together).
        A dead encoder's unflushed audio is encoded again by a fresh one from the PCM kept."""
        limit = self._samples_in * self.encoded_rate // self.sample_rate
        need = (math.ceil((limit + AAC_PRIMING) / AAC_FRAME) if limit else 0) - self._packets_muxed
        self._aac.finish()
        self._audio_pending.extend(self._aac.take())
        if len(self._audio_pending) < need:
            held = self._packets_muxed + len(self._audio_pending)
            start = max(0, held - 1) * AAC_FRAME * self.sample_rate // self.encoded_rate
            pcm = self._aac.pcm(start, self._samples_in)
            again = [] if pcm is None else _reencode(self.sample_rate, self.encoded_rate, self.channels,
                                                     self.audio_bitrate, pcm)
            # a fresh encoder fed from packet held-1's input: its packet 1 is the stream's packet `held`
            self._audio_pending.extend(again[1:] if held else again)
        tail, self._audio_pending = self._audio_pending[:max(0, need)], []
        self._aac.history.clear()
        if len(tail) < need:
            self._audio_lost = (need - len(tail)) * AAC_FRAME / self.encoded_rate
        return tail

    def _flush_held(self, tail: list[bytes]) -> bool:
        """The frames kept back for their audio and the audio tail: the last fragment (and segment)."""
        video, self._held = self._held, None
        self._audio_pending = list(tail)
        self._commit([self._encode_video([video])], len(tail), video.shape[0] / self.fps, lambda: None,
                     playlist=False)
        return True

    def _append_audio_tail(self, tail: list[bytes]) -> bool:
        run = TrackRun(2, self._packets_muxed * AAC_FRAME, [Sample(p, AAC_FRAME) for p in tail])
        self._append(media_fragment(self._sequence + 1, [run]), commit=True)
        self._sequence += 1
        self._packets_muxed += len(tail)
        return True

    def _finish_hls(self, tail: list[bytes]) -> None:
        """The last block's segment gets the audio tail too (every segment holds both tracks, and the
        playlist's audio ends with its video); a segment whose write failed (disk full) is written now."""
        behind = self._seg_sequence != self._block_sequence
        if not self.paths.hls_dir or not self._hls_ready or not self._blocks or not (tail or behind):
            return
        runs = list(self._last_runs)
        if tail:
            video_run, audio_run = runs
            runs = [video_run, TrackRun(audio_run.track_id, audio_run.base_time,
                                        audio_run.samples + [Sample(p, AAC_FRAME) for p in tail])]
        fragment = media_fragment(self._block_sequence, runs)
        if behind:
            self._write_segment(fragment, self._last_seconds, playlist=False)
        else:
            path = self.paths.hls_dir / segment_name(self._seg_next - 1)
            self._writing = path
            _atomic_write(path, fragment)

    def _rewrite_init(self) -> None:
        """The init segment again, same size, with the exact audio length (trims the AAC end padding)."""
        muxed = max(0, self._packets_muxed * AAC_FRAME - AAC_PRIMING)
        init = self._make_init(audio_duration=min(muxed, self._samples_in * self.encoded_rate // self.sample_rate))
        assert len(init) == len(self._init)
        self._writing = self.paths.mp4
        _pwrite(self._mp4, init, 0)
        self._init = init
        if self.paths.hls_dir:
            self._writing = self.paths.hls_dir / "init.mp4"
            _atomic_write(self._writing, init)

    def _end_playlist(self) -> None:
        try:
            self._write_playlist(ended=True)
        except OSError:
            # no room for a new playlist: the old one is whole, so ending it in place is enough
            with open(self.paths.playlist, "ab", buffering=0) as f:
                _write_all(f, b"#EXT-X-ENDLIST\n")

    # -- files ----------------------------------------------------------------------------------
    def _make_reserve(self) -> None:
        try:
            with open(self._reserve, "wb", buffering=0) as f:
                try:
                    os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
                except (AttributeError, OSError):
                    _write_all(f, bytes(RESERVE_BYTES))
        except OSError:  # not even that much room: go on without (a full disk still ends the stream)
            try:
                _remove(self._reserve)
            except OSError:
                pass

    def _make_init(self, audio_duration: Optional[int] = None) -> bytes:
        tracks = [self._video_track]
        if self._aac:
            tracks.append(AudioTrack(self.encoded_rate, self.channels, AAC_PRIMING))
        scale = self.encoded_rate or self.video_timescale
        return init_segment(tracks, movie_timescale=scale, audio_duration=audio_duration)

    def _append(self, data: bytes, commit: bool) -> None:
        """Append at the end of the whole boxes. commit: `data` is a fragment, written with its moof
        typed `free` and switched to `moof` (4 bytes, in one page) once all of it is on disk."""
        self._writing = self.paths.mp4
        self._drop_torn_tail()
        at = self._committed
        if commit:
            pad = _FREE8 if (at + 4) // _PAGE != (at + 7) // _PAGE else b""
            flip = at + len(pad) + 4
            data = pad + data[:4] + b"free" + data[8:]
        _write_all(self._mp4, data)
        if commit:
            _pwrite(self._mp4, b"moof", flip)
        self._committed = at + len(data)

    def _drop_torn_tail(self) -> None:
        """After a failed append: the file back to its whole boxes (truncating needs no space)."""
        if self._mp4.tell() != self._committed:
            self._mp4.truncate(self._committed)
            self._mp4.seek(self._committed)

    def _publish(self) -> None:
        """The first fragment is whole: the MP4 takes its name (replacing an earlier run's), and the
        HLS folder drops that run's segments."""
        self._writing = self.paths.mp4
        if os.name == "nt":  # Windows cannot rename an open file: close, rename, open again at the end
            self._mp4.close()
            os.replace(self._part, self.paths.mp4)
            self._mp4 = open(self.paths.mp4, "r+b", buffering=0)
            self._mp4.seek(self._committed)
        else:
            os.replace(self._part, self.paths.mp4)
        self._published = True
        if self.paths.hls_dir:
            self._writing = self.paths.hls_dir
            for p in self.paths.hls_dir.iterdir():
                if (_SEGMENT_RE.fullmatch(p.name) or p.name in ("index.m3u8.tmp", "init.mp4.tmp")) and p.is_file():
                    _remove(p)
            self._writing = self.paths.hls_dir / "init.mp4"
            _atomic_write(self._writing, self._init)
            self._hls_ready = True

    def _write_segment(self, fragment: bytes, seconds: float, playlist: bool = True) -> Optional[Path]:
        if not self.paths.hls_dir:
            return None
        index = self._seg_next
        path = self.paths.hls_dir / segment_name(index)
        self._writing = path
        _atomic_write(path, fragment)
        self._seg_next += 1
        self._seg_sequence = self._block_sequence
        self._lines.append(f"#EXTINF:{seconds:.6f},\n{path.name}\n")
        self._target = max(self._target, math.ceil(seconds))
        if self.hls_window:
            self._seg_first = max(0, self._seg_next - self.hls_window)
        if playlist:
            self._write_playlist(ended=False)
        if self.hls_window and index >= 2 * self.hls_window:
            self._writing = self.paths.hls_dir
            _remove(self.paths.hls_dir / segment_name(index - 2 * self.hls_window))
        return path

    def _write_playlist(self, ended: bool) -> None:
        head = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-TARGETDURATION:{self._target}",
                f"#EXT-X-MEDIA-SEQUENCE:{self._seg_first}"]
        if not self.hls_window:  # a rolling playlist drops segments: not an EVENT playlist
            head.append("#EXT-X-PLAYLIST-TYPE:EVENT")
        head.append("#EXT-X-INDEPENDENT-SEGMENTS")
        if not self.hls_window:
            head.append("#EXT-X-START:TIME-OFFSET=0")
        head.append('#EXT-X-MAP:URI="init.mp4"')
        text = "\n".join(head) + "\n" + "".join(self._lines) + ("#EXT-X-ENDLIST\n" if ended else "")
        self._writing = self.paths.playlist
        _atomic_write(self.paths.playlist, text.encode())

    def _disk_error(self, e: OSError) -> MediaError:
        """One MediaError for a failed write: which file, how much space is left, what to do."""
        path = Path(e.filename) if getattr(e, "filename", None) else self._writing
        if path == self._part:
            path = self.paths.mp4
        try:
            free = f"{shutil.disk_usage(path if path.is_dir() else path.parent).free / 2 ** 20:.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        if e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            fix = "free some space, or write somewhere else (--out / the output folder)"
        elif e.errno == errno.EROFS:
            fix = "the disk became read-only: choose another output folder (--out)"
        elif e.errno in (errno.EACCES, errno.EPERM):
            fix = "make the folder writable, or choose another output folder (--out)"
        else:
            fix = "check the disk, or choose another output folder (--out)"
        return MediaError(f"cannot write {path}: {e.strerror or e} ({free}); {fix}")


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


__all__ = ["LivePaths", "BlockWritten", "LiveSummary", "LiveWriter", "Playlist", "read_playlist", "AAC_PRIMING",
           "segment_name", "RESERVE_BYTES"]
