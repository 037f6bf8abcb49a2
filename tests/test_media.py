"""MP4 / live fMP4 / HLS writing, checked by decoding the files back with the same ffmpeg binary."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from harness.writer import reap

from omniforcing_core import fmp4
from omniforcing_core.layout import DEFAULT_TIME, make_layout
from omniforcing_core.live import LiveWriter, read_playlist
from omniforcing_core.media import (MediaError, decode_audio, decode_video_gray, probe_media, to_uint8_frames,
                                    write_mp4)

FPS = DEFAULT_TIME.fps
FRAME = 1.0 / FPS  # the A/V budget: one video frame
W, H = 64, 48
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# signals with one event at a known time: a white frame and a click


def clip(n_frames: int, n_samples: int, sample_rate: int, event_s: float, channels: int = 2):
    frames = np.full((n_frames, H, W, 3), 30, np.uint8)
    frames[round(event_s * FPS)] = 255
    audio = np.zeros((channels, n_samples), np.float32)
    at = round(event_s * sample_rate)
    audio[:, at:at + sample_rate // 500] = 0.8  # 2 ms click
    return frames, audio


def event_offset(path) -> float:
    """Click time minus white-frame time, as decoded (s)."""
    info = probe_media(path)
    wave = decode_audio(path)[0]
    luma = decode_video_gray(path).mean(axis=(1, 2))
    t_click = info.audio.start + np.argmax(np.abs(wave) > 0.5 * np.abs(wave).max()) / info.audio.sample_rate
    t_flash = info.video.start + np.argmax(luma > 128) / FPS
    return t_click - t_flash


def model_blocks(k: int, sample_rate: int):
    """(frames, samples) per block as the real model produces them (v2 layout: 25 + 24...)."""
    t, layout = DEFAULT_TIME, make_layout("v2")
    out = []
    for b in layout.iter_blocks(k):
        frames = t.video.frames_for_latents(b.video_end) - t.video.frames_for_latents(b.video_start)
        mels = t.audio.frames_for_latents(b.audio_end) - t.audio.frames_for_latents(b.audio_start)
        out.append((frames, mels * sample_rate // int(t.mel_rate)))
    return out


def test_model_block_sizes():
    assert model_blocks(3, 24000) == [(25, 24240), (24, 24000), (24, 24000)]
    assert model_blocks(2, 48000) == [(25, 48480), (24, 48000)]


# ---------------------------------------------------------------------------------------------
# one-shot MP4


@pytest.mark.parametrize("sample_rate", [24000, 48000])
def test_write_mp4_roundtrip_and_av_sync(tmp_path, sample_rate):
    event = 31 / FPS  # not on a second boundary
    frames, audio = clip(60, round(60 / FPS * sample_rate), sample_rate, event)
    written = write_mp4(tmp_path / "a.mp4", frames, FPS, audio, sample_rate)
    assert (written.num_frames, written.width, written.height, written.padded) == (60, W, H, False)
    info = probe_media(written.path)
    assert info.num_streams == 2
    assert (info.video.codec, info.audio.codec) == ("h264", "aac")
    assert info.video.frames == 60
    assert info.video.duration == pytest.approx(60 / FPS, abs=1e-6)
    assert info.audio.sample_rate == sample_rate and info.audio.channels == 2
    assert info.audio.duration == pytest.approx(written.audio_seconds, abs=1e-3)
    assert abs(info.av_drift) < FRAME
    assert abs(event_offset(written.path)) < FRAME / 4


def test_write_mp4_pads_or_rejects_odd_sizes(tmp_path):
    frames = np.random.default_rng(0).random((5, 33, 47, 3), dtype=np.float32)  # float [0, 1] input
    written = write_mp4(tmp_path / "odd.mp4", frames, FPS)
    assert (written.width, written.height, written.padded) == (48, 34, True)
    info = probe_media(written.path)
    assert (info.num_streams, info.video.frames, info.video.width, info.video.height) == (1, 5, 48, 34)
    with pytest.raises(MediaError, match="even"):
        write_mp4(tmp_path / "odd2.mp4", frames, FPS, odd_size="error")


def test_write_mp4_resamples_rates_aac_lacks(tmp_path):
    frames, audio = clip(24, 25000, 25000, 0.5, channels=1)
    written = write_mp4(tmp_path / "r.mp4", frames, FPS, audio[0], 25000)
    info = probe_media(written.path)
    assert written.encoded_sample_rate == info.audio.sample_rate == 48000
    assert info.audio.duration == pytest.approx(1.0, abs=1e-3)


def test_frame_conversion():
    f = to_uint8_frames(np.ones((2, 4, 4), np.float32))
    assert f.shape == (2, 4, 4, 3) and f.dtype == np.uint8 and f.max() == 255


# ---------------------------------------------------------------------------------------------
# fMP4 building blocks


def test_adts_and_annexb_parsing():
    def header(n):  # 7-byte ADTS header (no CRC) for an n-byte frame
        return bytes([0xFF, 0xF1, 0x50, 0x80 | ((n >> 11) & 3), (n >> 3) & 0xFF, ((n & 7) << 5) | 0x1F, 0xFC])

    stream = header(10) + b"abc" + header(9) + b"de" + header(12)[:5]
    frames, rest = fmp4.split_adts(stream)
    assert frames == [b"abc", b"de"] and len(rest) == 5
    nals = fmp4.split_annexb(b"\x00\x00\x00\x01\x09\xf0\x00\x00\x01\x67\x01\x02\x00\x00\x01\x65\x88")
    assert nals == [b"\x09\xf0", b"\x67\x01\x02", b"\x65\x88"]
    units = fmp4.access_units(nals)
    assert len(units) == 1 and units[0].keyframe


def test_fragment_offsets_point_into_mdat():
    runs = [fmp4.TrackRun(1, 0, [fmp4.Sample(b"v" * 5, 1000)]), fmp4.TrackRun(2, 0, [fmp4.Sample(b"a" * 3, 1024)])]
    frag = fmp4.media_fragment(1, runs)
    moof_size = int.from_bytes(frag[:4], "big")
    assert frag[moof_size + 4:moof_size + 8] == b"mdat"
    assert frag[moof_size + 8:] == b"vvvvvaaa"


# ---------------------------------------------------------------------------------------------
# live writer


def feed(writer: LiveWriter, blocks, sample_rate: int, event_s: float = -1.0):
    """Write model-sized blocks; the click/flash event lands wherever event_s falls."""
    total_f, total_a = sum(f for f, _ in blocks), sum(a for _, a in blocks)
    frames, audio = clip(total_f, total_a, sample_rate, max(event_s, 0.0))
    if event_s < 0:
        frames[:] = 30
        audio[:] = 0.0
    f0 = a0 = 0
    for nf, na in blocks:
        yield writer.write(frames[f0:f0 + nf], audio[:, a0:a0 + na])
        f0, a0 = f0 + nf, a0 + na


def test_live_file_plays_while_it_grows(tmp_path):
    blocks = model_blocks(3, 24000)
    w = LiveWriter(tmp_path, FPS, 24000, W, H, align_av=False)  # every frame on disk when write() returns
    for i, state in enumerate(feed(w, blocks, 24000)):
        info = probe_media(w.paths.mp4)  # a reader opening the file mid-stream
        assert info.num_streams == 2
        assert info.video.frames == state.video_frames == sum(f for f, _ in blocks[:i + 1])
        assert info.audio.end == pytest.approx(state.audio_seconds, abs=1e-3)
        assert state.video_seconds - info.audio.end < 0.25  # the AAC encoder lags a few packets at most
        assert len(read_playlist(w.paths.playlist).segments) == i + 1
    w.close()


@pytest.mark.parametrize("sample_rate", [24000, 48000])
def test_live_close_av_sync_and_hls(tmp_path, sample_rate):
    blocks = model_blocks(3, sample_rate)
    with LiveWriter(tmp_path, FPS, sample_rate, W, H, align_av=False) as w:  # one segment per block
        list(feed(w, blocks, sample_rate, event_s=1.5))
    video_s = sum(f for f, _ in blocks) / FPS
    audio_s = sum(a for _, a in blocks) / sample_rate
    for path in (w.paths.mp4, w.paths.playlist):
        info = probe_media(path)
        assert info.num_streams == 2
        assert info.video.frames == sum(f for f, _ in blocks)
        assert info.video.duration == pytest.approx(video_s, abs=1e-6)
        assert info.audio.duration == pytest.approx(audio_s, abs=1024 / sample_rate)  # <= one AAC frame of padding
        assert abs(info.av_drift) < FRAME
        assert abs(event_offset(path)) < FRAME / 4
    playlist = read_playlist(w.paths.playlist)
    assert playlist.ended and playlist.seconds == pytest.approx(video_s, abs=1e-5)
    assert playlist.durations[0] == pytest.approx(25 / FPS, abs=1e-5)


def test_live_without_audio_input_keeps_the_clock(tmp_path):
    with LiveWriter(tmp_path, FPS, 24000, W, H) as w:
        w.write(np.zeros((25, H, W, 3), np.uint8))
        w.write(np.zeros((24, H, W, 3), np.uint8))
    info = probe_media(w.paths.mp4)
    assert abs(info.av_drift) < FRAME and info.audio.duration == pytest.approx(49 / FPS, abs=1024 / 24000)


def test_live_video_only(tmp_path):
    with LiveWriter(tmp_path, FPS, None, W, H, hls=False) as w:
        w.write(np.zeros((25, H, W, 3), np.uint8))
    info = probe_media(w.paths.mp4)
    assert info.num_streams == 1 and info.video.frames == 25 and w.paths.playlist is None


_KILLED_WRITER = textwrap.dedent("""
    import sys, time, numpy as np
    sys.path.insert(0, {repo!r})
    from omniforcing_core.live import LiveWriter
    w = LiveWriter({out!r}, {fps}, {sr}, {w}, {h}, align_av=False)
    print(w._aac.proc.pid, flush=True)
    for i, (nf, na) in enumerate({blocks!r}):
        frames = np.full((nf, {h}, {w}, 3), 40 * i, np.uint8)
        audio = (0.1 * np.sin(np.arange(na) / 7.0)).astype(np.float32)[None].repeat(2, 0)
        w.write(frames, audio)
    print("written", flush=True)
    time.sleep(60)  # never closes: the test kills us
""")


def test_live_survives_abrupt_stop(tmp_path):
    k, sr = 3, 24000
    blocks = model_blocks(k, sr)
    script = _KILLED_WRITER.format(repo=str(REPO), out=str(tmp_path), fps=FPS, sr=sr, w=W, h=H, blocks=blocks)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        encoder_pid = int(proc.stdout.readline())
        assert proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)  # no close(), no atexit, no flush
        proc.wait()
    reap(encoder_pid, strict=False)
    video_s = sum(f for f, _ in blocks) / FPS
    info = probe_media(tmp_path / "omniforcing.mp4")
    assert info.num_streams == 2
    assert info.video.frames == sum(f for f, _ in blocks)
    assert info.video.duration == pytest.approx(video_s, abs=1e-6)
    assert video_s - 0.3 < info.audio.end <= video_s  # all but the encoder's last few packets
    playlist = read_playlist(tmp_path / "hls" / "index.m3u8")
    assert not playlist.ended and len(playlist.segments) == k
    assert playlist.seconds == pytest.approx(video_s, abs=1e-5)
    assert probe_media(tmp_path / "hls" / "index.m3u8").video.frames == info.video.frames
    init = (tmp_path / "hls" / "init.mp4").read_bytes()
    for name, (nf, _) in zip(playlist.segments, blocks):  # each segment decodes on its own (after init)
        one = tmp_path / f"one_{name}.mp4"
        one.write_bytes(init + (tmp_path / "hls" / name).read_bytes())
        assert probe_media(one).video.frames == nf
