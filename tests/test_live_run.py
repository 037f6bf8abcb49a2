"""Running a stream into live files: decoder reach, presets, and files that survive a cancel."""
import dataclasses

import pytest
import torch
import torch.nn.functional as Fn

from omniforcing_core.av_stream import AVStreamer
from omniforcing_core.config import TINY
from omniforcing_core.decode import TemporalContext
from omniforcing_core.embedded import random_model, toy_text
from omniforcing_core.layout import DEFAULT_TIME, make_clip, make_layout
from omniforcing_core.live import LiveWriter, read_playlist
from omniforcing_core.live_run import PRESETS, DecodePlan, measure_context, run_stream
from omniforcing_core.media import probe_media
from omniforcing_core.sampling import Sampler

SR = 24000
SPF = SR // 100
FPS = DEFAULT_TIME.fps


def _smooth(x, axis):
    """Average with both neighbours along `axis` (replicate ends): a receptive field of +-1."""
    x = x.movedim(axis, -1)
    p = Fn.pad(x.reshape(-1, 1, x.shape[-1]), (1, 1), mode="replicate").reshape(*x.shape[:-1], -1)
    return ((p[..., :-2] + p[..., 1:-1] + p[..., 2:]) / 3).movedim(-1, axis)


def video_fn(z):
    """[B, C, F, h, w] -> [B, 1 + 8 (F-1), 16h, 16w, 3] in [0, 1] (ComfyUI's layout); reach +-1 latent."""
    z = _smooth(z.float(), 2)
    rgb = torch.sigmoid(z[:, :3])
    idx = torch.tensor([DEFAULT_TIME.video.latent_of_frame(t) for t in range(1 + 8 * (z.shape[2] - 1))])
    return rgb[:, :, idx].repeat_interleave(16, 3).repeat_interleave(16, 4).permute(0, 2, 3, 4, 1)


def audio_fn(z):
    """[B, 8, T, 16] -> [B, 2, (4T-3) * 240]; reach +-1 latent; whole sine periods per mel frame."""
    z = _smooth(z.float(), 2)
    level = torch.tanh(z.mean(dim=(1, 3)))
    idx = torch.tensor([DEFAULT_TIME.audio.latent_of_frame(t) for t in range(1 + 4 * (z.shape[2] - 1))])
    per = level[:, idx].repeat_interleave(SPF, 1) * 0.5
    wave = per * torch.sin(2 * torch.pi * 2 * (torch.arange(per.shape[1]) % SPF) / SPF)
    return torch.stack([wave, -wave], 1)


REACH = TemporalContext(1, 1)


def test_measure_context_finds_the_reach():
    lat = torch.randn(1, 128, 9, 2, 2)
    assert measure_context(video_fn, lat, DEFAULT_TIME.video, out_axis=1) == (REACH, False)
    got = measure_context(audio_fn, torch.randn(1, 8, 9, 16), DEFAULT_TIME.audio, out_axis=2, samples_per_frame=SPF)
    assert got == (REACH, False)
    assert measure_context(video_fn, lat[:, :, :5], DEFAULT_TIME.video, out_axis=1)[1]  # touches the ends
    with pytest.raises(ValueError, match="at least 5"):
        measure_context(video_fn, lat[:, :, :4], DEFAULT_TIME.video, out_axis=1)


def test_presets_are_short_and_scale_the_crossfade():
    b, f = PRESETS["balanced"](SPF), PRESETS["fast"](SPF)
    assert b.audio_crossfade == 4 * SPF and f.video.right < b.video.right <= 3


@pytest.fixture(scope="module")
def tiny():
    m = random_model(TINY)
    return m, toy_text(m, "a red ball bounces")


class Cancel(BaseException):
    """Stands in for a host's interrupt (not an Exception)."""


def blocks(model, text, seconds, stop_after=None):
    spec = make_clip(make_layout("v2"), 64, 64, seconds=seconds, seed=3)
    with torch.no_grad():
        for i, res in enumerate(Sampler(model, spec, text)):
            if stop_after is not None and i == stop_after:
                raise Cancel("user pressed cancel")
            yield res


def streamer(writer=None, plan=DecodePlan(REACH, REACH)):
    return AVStreamer(video_fn, audio_fn, video_context=plan.video, audio_context=plan.audio, writer=writer,
                      time=dataclasses.replace(DEFAULT_TIME, audio_sample_rate=SR))


def test_run_stream_keeps_exactly_the_whole_clip_decode(tiny):
    model, text = tiny
    results = list(blocks(model, text, 3))
    seen = []
    run = run_stream(iter(results), streamer(), on_block=lambda r, c: seen.append(r.block.index))
    v = torch.cat([r.video for r in results], 2)
    a = torch.cat([r.audio for r in results], 2)
    assert seen == [0, 1, 2] and run.blocks == 3 and run.num_frames == 73
    assert torch.allclose(run.video(), video_fn(v)[0], atol=1e-6)
    assert torch.allclose(run.audio(), audio_fn(a)[0], atol=1e-6)
    assert torch.equal(run.last_frame, run.video()[-1])
    light = run_stream(iter(results), streamer(), keep_video=False)
    assert light.video() is None and light.num_frames == 73 and light.audio() is not None


def test_run_stream_writes_playable_fmp4_and_hls(tiny, tmp_path):
    model, text = tiny
    writer = LiveWriter(tmp_path, FPS, SR, 32, 32)
    run = run_stream(blocks(model, text, 3), streamer(writer))
    info = probe_media(writer.paths.mp4)
    assert info.num_streams == 2 and info.video.frames == 73 == run.num_frames
    assert info.audio.duration == pytest.approx(run.num_samples / SR, abs=0.03)
    pl = read_playlist(writer.paths.playlist)
    assert pl.ended and pl.seconds == pytest.approx(73 / FPS, abs=1e-3)


def test_cancel_keeps_what_was_made_and_closes_the_files(tiny, tmp_path):
    model, text = tiny
    writer = LiveWriter(tmp_path, FPS, SR, 32, 32)
    with pytest.raises(Cancel):
        run_stream(blocks(model, text, 5, stop_after=2), streamer(writer))
    info = probe_media(writer.paths.mp4)
    assert info.video.frames == 49 and info.audio is not None  # blocks 0 and 1: 25 + 24 frames
    assert read_playlist(writer.paths.playlist).ended
