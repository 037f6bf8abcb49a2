"""The streaming driver: decode plans, generated blocks -> decoders -> live files, and files that survive a stop."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.av import RecordingWriter, reach_decoders
from omniforcing_core.config import TINY
from omniforcing_core.decode import TemporalContext, audio_decoder, probe_reach, video_decoder
from omniforcing_core.embedded import random_model, toy_text
from omniforcing_core.layout import DEFAULT_TIME, TimeBase, make_clip, make_layout
from omniforcing_core.live import LiveWriter, read_playlist
from omniforcing_core.media import probe_media
from omniforcing_core.modality import AV
from omniforcing_core.preview import PreviewAudioDecoder, PreviewVideoDecoder, preview_decoders
from omniforcing_core.sampling import Sampler, generate
from omniforcing_core.streaming import (PRESETS, AVAligner, AVStreamer, decode_plan, measure_reach, probe_latents,
                                        run_stream, stream_time)

ROOT = Path(__file__).resolve().parents[1]
SR = 24000
FPS = DEFAULT_TIME.fps
REACH = TemporalContext(1, 1)
TIME = stream_time(SR)


def exact(video=REACH, audio=REACH):
    return decode_plan("exact", reach_decoders(video, audio, TIME), TIME)


@pytest.fixture(scope="module")
def tiny():
    m = random_model(TINY)
    return m, toy_text(m, "a red ball bounces")


class Cancel(BaseException):
    """Stands in for a host's interrupt (not an Exception)."""


def blocks(model, text, seconds, stop_after=None, seed=3):
    """The sampler's blocks; no_grad only around each step, never across a yield (an abandoned generator
    would otherwise leave gradients off for every later test)."""
    clip = make_clip(make_layout("v2"), 64, 64, seconds=seconds, seed=seed)
    it = iter(Sampler(model, clip, text))
    for i in range(clip.num_blocks):
        if stop_after is not None and i == stop_after:
            raise Cancel("user pressed cancel")
        with torch.no_grad():
            res = next(it)
        yield res


# -- decoders and plans ------------------------------------------------------------------------------


def test_probe_reach_on_comfy_layout_decoders():
    v, a = reach_decoders(REACH, TemporalContext(2, 1), TIME)
    assert probe_reach(video_decoder(v.fn, None, TIME), torch.randn(1, 128, 9, 2, 2)) == (REACH, False)
    assert measure_reach(audio_decoder(a.fn, None, TIME), "audio", TIME) == (TemporalContext(2, 1), False)
    assert probe_latents("video").shape == (1, 128, 35, 2, 2) and probe_latents("audio").shape == (1, 8, 99, 16)


def test_preview_decoders_state_their_exact_reach():
    for d, lat in zip(preview_decoders(), (torch.randn(1, 128, 9, 2, 2), torch.randn(1, 8, 9, 16))):
        assert probe_reach(d, lat.double()) == (d.reach, False)


def test_presets_cap_the_reach_and_crossfade_audio_seams():
    spf = TIME.samples_per_mel_frame
    long = reach_decoders(TemporalContext(14, 14), TemporalContext(37, 5), TIME)
    for mode, preset in PRESETS.items():
        plan = decode_plan(mode, long, TIME)
        assert (plan.decoders.video.reach, plan.decoders.audio.reach) == tuple(preset.reach)
        assert plan.decoders.video.crossfade == 0 and plan.decoders.audio.crossfade == 4 * spf
    assert decode_plan("fast", long, TIME).decoders.video.reach.right < \
        decode_plan("balanced", long, TIME).decoders.video.reach.right <= 3
    # a decoder already within the preset stays exact; one of unknown reach gets the preset
    short = decode_plan("balanced", reach_decoders(REACH, REACH, TIME), TIME)
    assert short.decoders.audio.reach == REACH and short.decoders.audio.crossfade == 0
    unknown = AV(video_decoder(long.video.fn, None, TIME), audio_decoder(long.audio.fn, None, TIME))
    assert decode_plan("fast", unknown, TIME).decoders.audio.reach == PRESETS["fast"].reach.audio
    with pytest.raises(ValueError, match="reach"):
        decode_plan("exact", unknown, TIME)
    with pytest.raises(ValueError, match="exact, balanced, fast"):
        decode_plan("slow", long, TIME)


# -- the A/V aligner ----------------------------------------------------------------------------------


def test_aligner_releases_equal_spans_of_time():
    al = AVAligner(TimeBase(fps=24, audio_sample_rate=24000))
    al.add(torch.zeros(25, 2, 2, 3), torch.zeros(2, 10500))  # audio is behind: 10 whole frames
    f, a, f0, s0 = al.take()
    assert (f.shape[0], a.shape[-1], f0, s0) == (10, 10000, 0, 0)
    al.add(None, torch.zeros(2, 30000))  # audio now ahead: the video's 15 frames go out
    f, a, f0, s0 = al.take()
    assert (f.shape[0], a.shape[-1], f0, s0) == (15, 15000, 10, 10000)
    assert al.take()[0] is None
    f, a, _, s0 = al.take(final=True)
    assert f is None and (a.shape[-1], s0) == (15500, 25000)


def test_aligner_rounds_at_fractional_rates():
    al = AVAligner(TimeBase(fps=24000 / 1001, audio_sample_rate=44100))  # 1839.3375 samples per frame
    al.add(torch.zeros(10, 1, 1, 3), torch.zeros(1, 5000))
    f, a, _, _ = al.take()
    assert f.shape[0] == 2 and a.shape[-1] == al.sample_at(2) == 3679


# -- streamed == whole-clip decode ------------------------------------------------------------------


def test_streamed_decode_equals_offline_decode_of_the_whole_clip(tiny):
    model, text = tiny
    clip = make_clip(make_layout("v2"), 64, 64, seconds=3, seed=4)
    st = AVStreamer(decode_plan("exact", preview_decoders()))
    chunks = [st.push(res) for res in Sampler(model, clip, text)] + [st.finish()]
    v, a = generate(model, clip, text)
    want_v = PreviewVideoDecoder()(v)[0].permute(1, 2, 3, 0).float()
    want_a = PreviewAudioDecoder()(a)[0].float()
    got_v = torch.cat([c.frames for c in chunks if c.frames is not None])
    got_a = torch.cat([c.audio for c in chunks if c.audio is not None], -1)
    assert got_v.shape == want_v.shape == (73, 64, 64, 3)
    assert got_a.shape == want_a.shape == (2, (4 * 76 - 3) * 240)
    assert (got_v - want_v).abs().max().item() < 1e-6 and (got_a - want_a).abs().max().item() < 1e-6
    for c in chunks[:-1]:  # every chunk but the final flush covers the same time in both modalities
        assert c.first_sample == c.first_frame * 1000 and c.end_sample == c.end_frame * 1000


def test_run_stream_keeps_exactly_the_whole_clip_decode(tiny):
    model, text = tiny
    results = list(blocks(model, text, 3))
    seen = []
    plan = exact()
    run = run_stream(iter(results), plan, on_block=lambda r, c: seen.append(r.block.index))
    v = torch.cat([r.video for r in results], 2)
    a = torch.cat([r.audio for r in results], 2)
    assert seen == [0, 1, 2] and run.blocks == 3 and run.num_frames == 73 and run.ttfc_s > 0
    assert torch.allclose(run.video(), plan.decoders.video(v)[0], atol=1e-6)
    assert torch.allclose(run.audio(), plan.decoders.audio(a)[0], atol=1e-6)
    assert torch.equal(run.last_frame, run.video()[-1])
    light = run_stream(iter(results), plan, keep_video=False)
    assert light.video() is None and light.num_frames == 73 and light.audio() is not None


# -- live files ---------------------------------------------------------------------------------------


def test_run_stream_writes_playable_fmp4_and_hls(tiny, tmp_path):
    model, text = tiny
    writer = LiveWriter(tmp_path, FPS, SR, 64, 64)
    run = run_stream(blocks(model, text, 3), exact(), writer)
    info = probe_media(writer.paths.mp4)
    assert info.num_streams == 2 and info.video.frames == 73 == run.num_frames
    assert info.audio.duration == pytest.approx(run.num_samples / SR, abs=0.03)
    pl = read_playlist(writer.paths.playlist)
    assert pl.ended and pl.seconds == pytest.approx(73 / FPS, abs=1e-3)


def test_cancel_keeps_what_was_made_and_closes_the_files(tiny, tmp_path):
    model, text = tiny
    writer = LiveWriter(tmp_path, FPS, SR, 64, 64)
    with pytest.raises(Cancel):
        run_stream(blocks(model, text, 5, stop_after=2), exact(), writer)
    info = probe_media(writer.paths.mp4)
    assert info.video.frames == 49 and info.audio is not None  # blocks 0 and 1: 25 + 24 frames
    assert abs(info.av_drift) < 1024 / SR
    assert read_playlist(writer.paths.playlist).ended


def test_a_stop_on_cancel_anywhere_returns_what_was_made(tiny, tmp_path):
    """stop_on: a cancel raised while sampling, while decoding or in on_block ends the stream like its
    end - the run comes back with what was made and the files closed - while any other exception (and
    a cancel not named in stop_on, the negative control) still propagates."""
    model, text = tiny
    whole = run_stream(blocks(model, text, 2), exact(), keep_video=True)  # 49 frames: blocks 0 and 1

    def decoding_cancels(plan, at):
        calls = {"n": 0}
        v = plan.decoders.video

        def fn(z):
            calls["n"] += 1
            if calls["n"] == at:
                raise Cancel("interrupt inside the VAE decode")
            return v.fn(z)
        return decode_plan("exact", AV(video_decoder(fn, REACH, TIME), plan.decoders.audio), TIME)

    cases = {"sampling": dict(blocks=blocks(model, text, 5, stop_after=2)),
             "decoding": dict(plan=decoding_cancels(exact(), 3)),
             "on_block": dict(on_block=lambda r, c: (_ for _ in ()).throw(Cancel()) if r.block.index == 1 else None)}
    for where, kw in cases.items():
        writer = LiveWriter(tmp_path / where, FPS, SR, 64, 64)
        run = run_stream(kw.get("blocks", blocks(model, text, 5)), kw.get("plan", exact()), writer,
                         on_block=kw.get("on_block"), stop_on=(Cancel,))
        assert isinstance(run.interrupted, Cancel), where
        info = probe_media(writer.paths.mp4)
        assert read_playlist(writer.paths.playlist).ended, where
        assert info.video.frames == run.num_frames >= 25 and abs(info.av_drift) < 1024 / SR, (where, info)
        if where == "sampling":  # what a cancel after block 1 leaves equals the start of a whole decode
            assert torch.equal(run.video(), whole.video()[:run.num_frames])
    with pytest.raises(Cancel):  # not named: it propagates, after closing the files
        run_stream(blocks(model, text, 5, stop_after=2), exact(), LiveWriter(tmp_path / "x", FPS, SR, 64, 64),
                   stop_on=(KeyboardInterrupt,))


def test_stream_cut_after_k_blocks_leaves_k_seconds_playable(tiny, tmp_path):
    model, text = tiny
    writer = LiveWriter(tmp_path, FPS, SR, 64, 64, align_av=False)  # no frames held back for their audio
    st = AVStreamer(decode_plan("exact", preview_decoders()), writer)
    for k, res in enumerate(blocks(model, text, 4)):
        st.push(res)
        if k == 1:
            break  # a kill: the writer is never closed
    info = probe_media(tmp_path / "omniforcing.mp4")
    # preview video reaches no latent ahead, preview audio neither; each block's last frame waits for the
    # next block's audio (a block's audio ends 1/100 s after its first frame time, its video 1/24 s)
    assert info.num_streams == 2 and info.video.frames == 48
    assert abs(info.video.duration - 48 / 24) < 1e-6


def test_audio_held_back_past_the_last_frame_still_reaches_the_file(tiny, tmp_path):
    # video with no look-ahead, audio looking 3 latents ahead: video waits for audio, and everything
    # left goes out at finish()
    model, text = tiny
    writer = RecordingWriter(LiveWriter(tmp_path, FPS, SR, 64, 64))
    run_stream(blocks(model, text, 3), exact(TemporalContext(0, 0), TemporalContext(0, 3)), writer)
    info = probe_media(tmp_path / "omniforcing.mp4")
    assert info.video.frames == 73 == sum(c.frames for c in writer.calls)
    assert sum(c.samples for c in writer.calls) == (4 * 76 - 3) * 240
    assert abs(info.audio.duration - (4 * 76 - 3) / 100) < 0.03  # the whole decoded audio, AAC-framed
    assert abs(info.av_drift) < 1 / 24


# -- the demo ------------------------------------------------------------------------------------------


def test_demo_writes_mp4_and_hls_with_audio_in_sync(tmp_path):
    r = subprocess.run([sys.executable, "-m", "omniforcing_core", "demo", "--seconds", "3", "--out", str(tmp_path),
                        "--height", "64", "--width", "96"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["blocks"] == 3 and report["video_frames"] == 73 and report["ttfc_s"] > 0
    from omniforcing_core.toy.default import has_trained_assets
    assert report["model"] == ("trained toy student" if has_trained_assets() else "random tiny model")
    for path in (tmp_path / "omniforcing.mp4", tmp_path / "hls" / "index.m3u8"):
        info = probe_media(path)
        assert info.num_streams == 2
        assert info.video.codec == "h264" and info.audio.codec == "aac" and info.audio.sample_rate == 24000
        assert info.video.frames == 73 and (info.video.width, info.video.height) == (96, 64)
        assert abs(info.av_drift) < 1 / 24  # audio and video end within one frame
