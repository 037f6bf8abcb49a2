import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

from omniforcing_core.av_stream import preview_streamer
from omniforcing_core.embedded import random_model, toy_text
from omniforcing_core.layout import make_clip, make_layout
from omniforcing_core.live import LiveWriter
from omniforcing_core.media import probe_media
from omniforcing_core.preview import PreviewAudioDecoder, PreviewVideoDecoder
from omniforcing_core.sampling import Sampler, generate

ROOT = Path(__file__).resolve().parents[1]


def test_streamed_decode_equals_offline_decode_of_the_whole_clip():
    model = random_model("tiny")
    clip = make_clip(make_layout("v2"), 64, 64, seconds=3)
    spec = dataclasses.replace(clip, seed=4)
    text = toy_text(model, "a blue square slides")
    st = preview_streamer()
    frames, audio = [], []
    for res in Sampler(model, spec, text):
        ch = st.push(res)
        frames.append(ch.frames)
        audio.append(ch.audio)
    last = st.finish()
    frames += [last.frames] if last.frames is not None else []
    audio += [last.audio] if last.audio is not None else []
    v, a = generate(model, spec, text)
    want_v = PreviewVideoDecoder()(v)[0].permute(1, 2, 3, 0).float()
    want_a = PreviewAudioDecoder()(a)[0].float()
    got_v = torch.cat([f for f in frames if f is not None])
    got_a = torch.cat([x for x in audio if x is not None], -1)
    assert got_v.shape == want_v.shape == (73, 64, 64, 3)
    assert got_a.shape == want_a.shape == (2, (4 * 76 - 3) * 240)
    assert (got_v - want_v).abs().max().item() < 1e-6 and (got_a - want_a).abs().max().item() < 1e-6


def test_stream_cut_after_k_blocks_leaves_k_seconds_playable(tmp_path):
    model = random_model("tiny")
    clip = make_clip(make_layout("v2"), 64, 64, seconds=4)
    writer = LiveWriter(tmp_path, 24, 24000, 64, 64)
    st = preview_streamer(writer)
    for k, res in enumerate(Sampler(model, clip, toy_text(model, "x"))):
        st.push(res)
        if k == 1:
            break  # a cancel: the writer is never closed
    info = probe_media(tmp_path / "omniforcing.mp4")
    assert info.num_streams == 2 and info.video.frames == 49
    assert abs(info.video.duration - 49 / 24) < 1e-6


def test_demo_writes_mp4_and_hls_with_audio_in_sync(tmp_path):
    r = subprocess.run([sys.executable, "-m", "omniforcing_core", "demo", "--seconds", "3", "--out", str(tmp_path),
                        "--height", "64", "--width", "96"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["blocks"] == 3 and report["video_frames"] == 73 and report["ttfc_s"] > 0
    from omniforcing_core.embedded import has_trained_assets
    assert report["model"] == ("trained toy student" if has_trained_assets() else "random tiny model")
    for path in (tmp_path / "omniforcing.mp4", tmp_path / "hls" / "index.m3u8"):
        info = probe_media(path)
        assert info.num_streams == 2
        assert info.video.codec == "h264" and info.audio.codec == "aac" and info.audio.sample_rate == 24000
        assert info.video.frames == 73 and (info.video.width, info.video.height) == (96, 64)
        assert abs(info.av_drift) < 1 / 24  # audio and video end within one frame


def test_audio_held_back_past_the_last_frame_still_reaches_the_file(tmp_path):
    # a video decoder with no temporal reach emits every frame at once; an audio decoder that looks
    # ahead holds its tail back until finish(), when no frames are left to carry it
    from omniforcing_core.av_stream import AVStreamer
    from omniforcing_core.decode import TemporalContext

    model = random_model("tiny")
    clip = make_clip(make_layout("v2"), 64, 64, seconds=3)
    pa = PreviewAudioDecoder()
    pv = PreviewVideoDecoder()

    def video(z):  # per-latent: frames of latent l depend on latent l only
        return pv(z).permute(0, 2, 3, 4, 1)

    writer = LiveWriter(tmp_path, 24, 24000, 64, 64)
    st = AVStreamer(video, pa, video_context=TemporalContext(pv.left_context, pv.right_context),
                    audio_context=TemporalContext(pa.left_context, pa.right_context + 3), writer=writer)
    for res in Sampler(model, clip, toy_text(model, "x")):
        st.push(res)
    st.finish()
    info = probe_media(tmp_path / "omniforcing.mp4")
    assert info.video.frames == 73
    assert abs(info.audio.duration - (4 * 76 - 3) / 100) < 0.03  # the whole decoded audio, AAC-framed
    assert abs(info.av_drift) < 1 / 24
