"""LiveWriter(align_av=True), issue 11 item 1: every fMP4 fragment / HLS segment ends its audio within one AAC
frame of its video. The AAC encoder holds back a few packets, so the writer keeps back the frames its audio
does not cover yet and writes them (encoded again, from a keyframe) with the next block; every stop flushes
them, so the files still end with audio and video together. Files are decoded back with `probe_media`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from harness.writer import CTRL_C_WRITER

from harness.av import format_segment_table, segment_ends
from omniforcing_core import live
from omniforcing_core.live import LiveWriter, read_playlist
from omniforcing_core.media import MediaError, probe_media
from test_faults_writer import FakeDisk, mp4_fragments

REPO = Path(__file__).resolve().parents[1]
FPS, SR, W, H = 24, 24000, 64, 48
NF, NA = 12, 12000  # one block: 0.5 s of video and audio
AAC = 1024


def block(i: int, nf: int = NF, na: int = NA, sr: int = SR):
    frames = np.full((nf, H, W, 3), (40 * i) % 256, np.uint8)
    t = np.arange(i * na, (i + 1) * na) / sr
    return frames, np.repeat((0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None], 2, 0)


def writer(out: Path, sr: int = SR, **kw) -> LiveWriter:
    return LiveWriter(out, FPS, sr, W, H, align_av=True, **kw)


def assert_aligned(out: Path, frames: int, sr: int = SR, mid=(0, AAC), hls: bool = True) -> None:
    """Whole fragments, ended playlist, `frames` frames in both files, A/V ending together (one AAC frame);
    every segment but the last ends its audio `mid` samples (at the encoded rate) after its video, and
    decodes alone from a keyframe (EXT-X-INDEPENDENT-SEGMENTS)."""
    mp4, playlist = out / "omniforcing.mp4", out / "hls" / "index.m3u8"
    mp4_fragments(mp4)
    infos = [probe_media(mp4)] + ([probe_media(playlist)] if hls else [])
    for info in infos:
        assert info.video.frames == frames and abs(info.av_drift) * info.audio.sample_rate <= AAC, info
    if not hls:
        return
    pl = read_playlist(playlist)
    assert pl.ended and pl.seconds == pytest.approx(frames / FPS, abs=1e-5)
    rate = infos[0].audio.sample_rate
    rows = segment_ends(playlist)
    table = format_segment_table(str(out), rows, rate)
    assert all(mid[0] <= r.skew_samples(rate) < mid[1] for r in rows[:-1]), table
    assert abs(rows[-1].skew_samples(rate)) <= AAC, table
    init = (out / "hls" / "init.mp4").read_bytes()
    for k, (name, seconds) in enumerate(zip(pl.segments, pl.durations)):
        alone = out / f"alone_{k}.mp4"
        alone.write_bytes(init + (out / "hls" / name).read_bytes())
        assert probe_media(alone).video.frames == round(seconds * FPS), name
        alone.unlink()


# ---------------------------------------------------------------------------------------------
# cutting


@pytest.mark.parametrize("sr, blocks", [(24000, [(25, 25000), (24, 24000), (24, 24000)]),
                                        (48000, [(12, 24000)] * 4),
                                        (25000, [(12, 12500)] * 4)])  # not an AAC rate: encoded at 48 kHz
def test_every_segment_ends_its_audio_with_its_video(tmp_path, sr, blocks):
    with writer(tmp_path, sr) as w:
        for i, (nf, na) in enumerate(blocks):
            state = w.write(*block(i, nf, na, sr))
            info = probe_media(w.paths.mp4)  # the file while it grows: aligned after every write
            assert info.video.frames == state.video_frames <= sum(f for f, _ in blocks[:i + 1])
            assert 0 <= info.audio.end - info.video.end < AAC / info.audio.sample_rate
            assert sum(f for f, _ in blocks[:i + 1]) - state.video_frames <= w._max_held
    assert_aligned(tmp_path, sum(f for f, _ in blocks))


def test_tiny_writes_wait_for_their_audio(tmp_path):
    """Writes shorter than the encoder's lag: the first ones put nothing on disk, nothing is lost."""
    with writer(tmp_path) as w:
        states = [w.write(*block(i, 2, 2000)) for i in range(8)]
        assert states[0].segment is None and states[0].fragment_bytes == 0 and states[0].video_frames == 0
        assert states[-1].video_frames > 0
    assert_aligned(tmp_path, 16)


def test_one_write_then_close(tmp_path):
    with writer(tmp_path) as w:
        w.write(*block(0, 3, 3000))
    assert_aligned(tmp_path, 3)


def test_audio_none_keeps_the_clock_with_frames_held(tmp_path):
    with writer(tmp_path) as w:
        for _ in range(3):
            w.write(np.zeros((NF, H, W, 3), np.uint8))
    assert_aligned(tmp_path, 3 * NF)


def test_callers_handing_unequal_spans_are_not_waited_for(tmp_path):
    """Less audio than video: frames are not kept back for audio that was never given; more audio than
    video: the packets past the video wait, a bounded number of them."""
    with writer(tmp_path / "short") as w:
        for i in range(4):
            w.write(*block(i, NF, NA // 2))
            assert w._held is None
    assert probe_media(w.paths.mp4).video.frames == 4 * NF
    with writer(tmp_path / "long") as w:
        for i in range(6):
            w.write(*block(i, NF, 2 * NA))
            assert len(w._audio_pending) <= live._MAX_HELD_PACKETS + live._ENCODER_LAG_PACKETS
    assert probe_media(w.paths.mp4).video.frames == 6 * NF


def test_align_av_must_be_a_bool(tmp_path):
    with pytest.raises(MediaError, match="align_av"):
        LiveWriter(tmp_path, FPS, SR, W, H, align_av="yes")
    assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------
# stops: the frames kept back are written with the audio tail, whatever ends the stream


def test_encoder_killed_mid_stream(tmp_path):
    w = writer(tmp_path)
    for i in range(2):
        w.write(*block(i))
    assert w._held is not None  # the case under test: frames waiting for audio when the encoder dies
    w._aac.proc.kill()
    w._aac.proc.wait()
    with pytest.raises(MediaError, match="AAC encoder"):
        w.write(*block(2))
    w.close()
    assert_aligned(tmp_path, 2 * NF)


@pytest.mark.parametrize("where", ["audio", "frames"])
def test_non_finite_output(tmp_path, where):
    w = writer(tmp_path)
    for i in range(2):
        w.write(*block(i))
    frames, audio = block(2)
    frames = frames.astype(np.float32) / 255
    if where == "audio":
        audio[0, 5] = np.nan
    else:
        frames[1, 2, 3, 0] = np.inf
    with pytest.raises(MediaError, match="NaN/Inf"):
        w.write(frames, audio)
    assert w.closed
    assert_aligned(tmp_path, 2 * NF)


def test_disk_full_mid_fragment(tmp_path, monkeypatch):
    disk = FakeDisk(tmp_path)
    monkeypatch.setattr(live, "open", disk.open, raising=False)
    w = writer(tmp_path)
    for i in range(3):
        w.write(*block(i))
    disk.capacity = disk.used() + 3000
    with pytest.raises(MediaError, match="No space left"):
        w.write(*block(3))
    w.close()
    assert_aligned(tmp_path, 3 * NF)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_disk_full_on_a_segment(tmp_path, monkeypatch):
    """The MP4 took the block, its segment did not fit: at close that segment is written, then the last."""
    disk = FakeDisk(tmp_path)
    monkeypatch.setattr(live, "open", disk.open, raising=False)
    w = writer(tmp_path)
    for i in range(3):
        w.write(*block(i))
    disk.capacity, disk.only = disk.used() + 1000, lambda name: ".m4s" in name
    with pytest.raises(MediaError, match=r"seg_00003\.m4s.*No space left"):
        w.write(*block(3))
    w.close()
    assert_aligned(tmp_path, 4 * NF)




@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_ctrl_c_closes_and_sigkill_leaves_an_aligned_file(tmp_path, sig):
    """Ctrl-C (to the process group): the block being written is finished and close() writes the frames kept
    back. SIGKILL: no close, the frames kept back are lost, but what is on disk is whole and aligned."""
    script = CTRL_C_WRITER.format(repo=str(REPO), out=str(tmp_path), fps=FPS, sr=SR, w=W, h=H, nf=NF, na=NA,
                                  kwargs=", align_av=True")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        seen = ""
        while not seen.endswith("block 2\n"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            seen += line
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    printed = int([ln for ln in (seen + out).splitlines() if ln.startswith("block")][-1].split()[1]) + 1
    if sig == signal.SIGINT:
        assert proc.returncode == 0 and "interrupted" in out, err
        info = probe_media(tmp_path / "omniforcing.mp4")
        assert info.video.frames % NF == 0 and info.video.frames // NF in (printed, printed + 1)
        assert_aligned(tmp_path, info.video.frames)
    else:
        mp4_fragments(tmp_path / "omniforcing.mp4", torn_ok=True)
        info = probe_media(tmp_path / "omniforcing.mp4")
        assert printed * NF - 12 <= info.video.frames <= (printed + 1) * NF
        assert 0 <= info.audio.end - info.video.end < AAC / SR  # aligned even without close()
        assert not read_playlist(tmp_path / "hls" / "index.m3u8").ended


# ---------------------------------------------------------------------------------------------
# promises kept: rolling playlist, bounded memory, video-only writers


def test_rolling_playlist(tmp_path):
    with writer(tmp_path, hls_window=3) as w:
        for i in range(9):
            w.write(*block(i, 6, 6000))
        segments = read_playlist(w.paths.playlist).segments
        assert len(segments) == 3 and segments[-1] == w.summary().last_segment.name
    pl = read_playlist(w.paths.playlist)
    assert pl.ended and len(pl.segments) == 3 and pl.segments[0] != "seg_00000.m4s"
    kept = sorted(p.name for p in (tmp_path / "hls").glob("seg_*"))
    assert len(kept) == 6 and kept[-1] == pl.segments[-1]  # one window more, for clients on the old playlist
    assert probe_media(w.paths.playlist).video.frames == round(pl.seconds * FPS)
    assert probe_media(w.paths.mp4).video.frames == 54


def test_memory_stays_flat(tmp_path):
    w = writer(tmp_path)
    rng = np.random.default_rng(0)

    def blocks(start, n):
        for i in range(start, start + n):
            frames = rng.integers(0, 255, (6, H, W, 3), dtype=np.uint8)
            w.write(frames, rng.uniform(-0.3, 0.3, (2, 6000)).astype(np.float32))

    blocks(0, 4)
    tracemalloc.start()
    try:
        blocks(4, 4)
        base = tracemalloc.get_traced_memory()[0]
        blocks(8, 30)
        grown = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    w.close()
    assert grown / 30 < 600, f"{grown / 30:.0f} bytes per block"


def test_video_only_writer_ignores_align_av(tmp_path):
    with LiveWriter(tmp_path, FPS, None, W, H, hls=False, align_av=True) as w:
        assert w.write(np.zeros((5, H, W, 3), np.uint8)).video_frames == 5
    assert probe_media(w.paths.mp4).video.frames == 5
