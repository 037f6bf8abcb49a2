"""A->V and V->A in a real ComfyUI on the embedded toy (no model files): the sampler and the stream node
take an AUDIO or IMAGE input, encode it with the given VAE, hold it clean, and the stream's outputs and
file carry that media itself. The A->V / V->A example workflows (the toy's, driven by a clip of its
synthetic world, and the real model's with Load Audio on the tiny models) run as shipped."""
from __future__ import annotations

import math
import wave

import pytest

from conftest import needs_comfyui
from host import error_text, load_api_workflow, nodes_of, tinyfy

pytestmark = needs_comfyui


def tensors(host, name):
    from safetensors.torch import load_file

    return load_file(str(host.output / "tensors" / f"{name}.safetensors"))


def _graph(seconds: int = 2):
    """The toy stream graph plus a 2 s clip of the toy's world (loud, known sound and moving shapes, whatever
    the weights generate) whose IMAGE/AUDIO are the given media, and the offline sampler's inputs."""
    g = load_api_workflow("omniforcing_toy_stream")
    (toy,) = nodes_of(g, "OmniForcingToyModel")
    (stream,) = nodes_of(g, "OmniForcingStream")
    base = dict(g[stream]["inputs"], seconds=seconds, seed=3, decode="balanced")
    g[stream]["inputs"] = dict(base, filename_prefix="omniforcing/plain")
    g["11"] = {"class_type": "OmniForcingToyWorldClip", "inputs": {"seed": 5, "seconds": 2}}
    g["12"] = {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": "given_media", "image": ["11", 0], "audio": ["11", 1]}}
    sampler = {k: base[k] for k in ("model", "positive", "width", "height", "steps", "window", "layout")}
    return g, toy, stream, base, dict(sampler, seconds=2, seed=3)


def test_audio_and_video_inputs_drive_the_stream_and_the_sampler(host):
    import numpy as np
    import torch
    import torchaudio

    from omniforcing_core.media import decode_audio, decode_video_gray
    from omniforcing_core.toy.default import load_text_and_codecs
    from omniforcing_core.toy.encode import encode_audio

    g, toy, stream, base, sampler = _graph()
    g["20"] = {"class_type": "OmniForcingStream",
               "inputs": dict(base, filename_prefix="omniforcing/a2v", audio=["11", 1])}
    g["21"] = {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": "a2v", "image": ["20", 0], "audio": ["20", 1]}}
    g["30"] = {"class_type": "OmniForcingStream",
               "inputs": dict(base, filename_prefix="omniforcing/v2a", video=["11", 0], video_fps=24.0)}
    g["31"] = {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": "v2a", "image": ["30", 0], "audio": ["30", 1]}}
    g["32"] = {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": "plain", "image": [stream, 0], "audio": [stream, 1]}}
    g["40"] = {"class_type": "OmniForcingSampler", "inputs": dict(sampler, audio=["11", 1], audio_vae=[toy, 4])}
    g["41"] = {"class_type": "OmniForcingTestSaveTensors", "inputs": {"name": "a2v_latent", "latent": ["40", 0]}}
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    given, a2v, v2a, plain = (tensors(host, n) for n in ("given_media", "a2v", "v2a", "plain"))
    assert given["audio"].shape == (1, 1, 32000) and int(given["sample_rate"]) == 16000  # 2 s, mono 16 kHz
    # on the stream's clock: resampled to 24 kHz (torchaudio's resampler, as ComfyUI's audio nodes), mono widened
    want = torchaudio.functional.resample(given["audio"][0].double(), 16000, 24000).float().expand(2, -1)
    n = want.shape[-1]
    assert a2v["audio"].shape[-1] >= n and float((a2v["audio"][0, :, :n] - want).abs().max()) < 1e-4
    assert not torch.allclose(plain["audio"][0, :, :n], want, atol=1e-2)  # negative control
    assert torch.equal(v2a["image"], given["image"])  # the given frames themselves (same size and rate)
    assert not torch.allclose(plain["image"], given["image"], atol=1e-2)
    assert not torch.allclose(a2v["image"], plain["image"], atol=1e-3)  # the video followed the given audio
    # the files carry the same media (AAC / H.264 round trips)
    (mp4,) = host.output_files(entry, "20")
    got = decode_audio(mp4, 24000, 2)[:, :n]
    ref = want.numpy()[:, :got.shape[-1]]
    assert float(np.sqrt(((got - ref) ** 2).mean()) / np.sqrt((ref ** 2).mean())) < 0.05
    (mp4,) = host.output_files(entry, "30")
    luma = decode_video_gray(mp4).astype(np.float32)
    ref = (given["image"][..., :3] * torch.tensor([0.299, 0.587, 0.114])).sum(-1).numpy() * 255
    assert luma.shape == ref.shape and float(np.abs(luma - ref).mean()) < 6.0
    # the offline sampler holds the audio VAE's encode of the input (ComfyUI's protocol: at the VAE's 16 kHz,
    # the world's own rate), computed here by the core's toy encoder; the last latents see the end padding
    lat = tensors(host, "a2v_latent")["audio_latent"]
    wave = given["audio"][:, 0]
    want = encode_audio(load_text_and_codecs()[1], wave[:, :wave.shape[-1] // 640 * 640])
    assert lat.shape == (1, 8, 51, 16)
    assert float((lat[:, :, :48] - want[:, :, :48]).abs().max()) < 1e-4


@pytest.mark.parametrize("field,extra,needle", [
    ("audio", {"seconds": 3}, "the audio input is 2.00 s long, shorter than the 3 s asked: ask for at most 2 s"),
    ("video", {"seconds": 3}, "the video input is 2.04 s long, shorter than the 3 s asked: ask for at most 2 s"),
    ("both", {}, "give either 'audio' (audio -> video) or 'video' (video -> audio), not both"),
])
def test_given_input_errors_name_the_fix(host, field, extra, needle):
    g, toy, stream, base, _ = _graph()
    media = {"audio": {"audio": ["11", 1]}, "video": {"video": ["11", 0]},
             "both": {"audio": ["11", 1], "video": ["11", 0]}}[field]
    g[stream]["inputs"] = dict(g[stream]["inputs"], **media, **extra)
    entry = host.run(g)
    assert entry["status"]["status_str"] == "error"
    assert needle in error_text(entry), error_text(entry)


# -- the A->V / V->A example workflows -------------------------------------------------------------------

def _corr(a, b) -> float:
    """Pearson correlation of two equally long signals."""
    import numpy as np

    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum() + 1e-30))


def _luma(frames):
    """IMAGE-layout frames [N, H, W, 3] in [0, 1] -> BT.601 luma [N, H, W] in 0..255 (what H.264's gray is)."""
    import torch

    return ((frames[..., :3] * torch.tensor([0.299, 0.587, 0.114])).sum(-1) * 255).numpy()


def _toy_example(name: str, seconds: int = 2):
    """A shipped toy A->V / V->A example, shortened, with the stream's outputs saved and the caption shown."""
    from omniforcing_core.toy.world import make_clip

    g = load_api_workflow(name)
    (world,) = nodes_of(g, "OmniForcingToyWorldClip")
    (stream,) = nodes_of(g, "OmniForcingStream")
    (enc,) = nodes_of(g, "OmniForcingToyTextEncode")
    # the prompt is the shipped clip's caption (typed in, so batch prompts can replace it)
    w = g[world]["inputs"]
    assert g[enc]["inputs"]["text"] == make_clip(w["seed"], w["seconds"], 32).caption
    assert w["seconds"] == g[stream]["inputs"]["seconds"]
    g[world]["inputs"]["seconds"] = seconds
    g[stream]["inputs"]["seconds"] = seconds
    g["90"] = {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": name, "image": [stream, 0], "audio": [stream, 1]}}
    g["91"] = {"class_type": "PreviewAny", "inputs": {"source": [world, 2]}}
    return g, world, stream


def test_world_clip_node_gives_the_toy_worlds_clip(host):
    """The world clip node only converts types: frames, sound, caption and fps of the core's make_clip."""
    import torch

    from omniforcing_core.toy.world import make_clip

    info = host.get("/object_info/OmniForcingToyWorldClip")["OmniForcingToyWorldClip"]
    for name, spec in info["input"]["required"].items():
        assert spec[1].get("tooltip"), f"input {name} has no tooltip"
    assert info["output"] == ["IMAGE", "AUDIO", "STRING", "FLOAT"]
    assert len(info["output_tooltips"]) == 4 and all(info["output_tooltips"])
    assert "Load Audio" in info["description"] and "Load Video" in info["description"]
    g = {"1": {"class_type": "OmniForcingToyWorldClip", "inputs": {"seed": 3, "seconds": 2}},
         "2": {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": "world_clip", "image": ["1", 0], "audio": ["1", 1]}},
         "3": {"class_type": "PreviewAny", "inputs": {"source": ["1", 2]}},
         "4": {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}}
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    clip = make_clip(3, 2, 128)
    t = tensors(host, "world_clip")
    assert t["image"].shape == (49, 128, 128, 3) and torch.equal(t["image"], clip.video.permute(1, 2, 3, 0))
    assert t["audio"].shape == (1, 1, 32000) and torch.equal(t["audio"][0, 0], clip.audio)
    assert int(t["sample_rate"]) == 16000
    assert entry["outputs"]["3"]["text"] == [clip.caption] and entry["outputs"]["4"]["text"] == ["24.0"]


def test_toy_a2v_example_makes_video_for_the_world_clips_sound(host):
    """omniforcing_toy_a2v: the world clip's sound drives the stream; the file's audio track, decoded back,
    is that sound (against make_clip's waveform, not a re-decode), and its video the generated frames."""
    import numpy as np
    import torchaudio

    from omniforcing_core.media import decode_audio, decode_video_gray, probe_media
    from omniforcing_core.toy.world import make_clip

    g, world, stream = _toy_example("omniforcing_toy_a2v")
    assert g[stream]["inputs"]["audio"] == [world, 1] and "video" not in g[stream]["inputs"]
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    seed = g[world]["inputs"]["seed"]
    clip = make_clip(seed, 2, 128)
    assert len(clip.events) >= 2  # the clip sounds (else this test would prove little)
    assert entry["outputs"]["91"]["text"] == [clip.caption]
    # the AUDIO output: the world's sound at the stream's 24 kHz, both channels
    out = tensors(host, "omniforcing_toy_a2v")
    want = torchaudio.functional.resample(clip.audio[None].double(), 16000, 24000).float()
    n = want.shape[-1]
    assert out["audio"].shape[:2] == (1, 2) and out["audio"].shape[-1] >= n
    assert float((out["audio"][0, :, :n] - want).abs().max()) < 1e-4
    # the file: H.264 + AAC, 2 s; its sound decoded back at the world's own rate is the world's sound
    (mp4,) = host.output_files(entry, stream)
    info = probe_media(mp4)
    assert info.num_streams == 2 and (info.video.codec, info.audio.codec) == ("h264", "aac")
    assert info.video.frames == 49 and (info.video.width, info.video.height) == (128, 128)
    assert info.audio.duration == pytest.approx(2.0, abs=0.05) and abs(info.av_drift) < 1 / 24
    got = decode_audio(mp4, 16000, 2)  # both channels (ffmpeg's own stereo -> mono mix is louder by sqrt 2)
    m = min(got.shape[1], clip.audio.numel())
    assert m >= 31000
    ref = clip.audio.numpy()[:m]
    other = make_clip(seed + 1, 2, 128).audio.numpy()[:m]
    for ch in got[:, :m]:
        assert _corr(ch, ref) > 0.95
        assert float(np.sqrt(((ch - ref) ** 2).mean() / (ref ** 2).mean())) < 0.2
        assert abs(_corr(ch, other)) < 0.3  # negative control: another clip's sound
    # the video track: the generated frames the node returned (not the world's: only its sound was given)
    luma = decode_video_gray(mp4).astype(np.float32)
    assert out["image"].shape == (49, 128, 128, 3) and luma.shape == (49, 128, 128)
    assert float(np.abs(luma - _luma(out["image"])).mean()) < 6.0


def test_toy_v2a_example_makes_sound_for_the_world_clips_frames(host):
    """omniforcing_toy_v2a: the world clip's frames (and fps) drive the stream; the node returns those frames
    themselves and the file's video, decoded back, is them; the file has the generated sound."""
    import numpy as np
    import torch

    from omniforcing_core.media import decode_audio, decode_video_gray, probe_media
    from omniforcing_core.toy.world import make_clip

    g, world, stream = _toy_example("omniforcing_toy_v2a")
    assert g[stream]["inputs"]["video"] == [world, 0] and g[stream]["inputs"]["video_fps"] == [world, 3]
    assert "audio" not in g[stream]["inputs"]
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    seed = g[world]["inputs"]["seed"]
    clip = make_clip(seed, 2, 128)
    assert entry["outputs"]["91"]["text"] == [clip.caption]
    frames = clip.video.permute(1, 2, 3, 0)  # [49, 128, 128, 3]
    out = tensors(host, "omniforcing_toy_v2a")
    assert out["image"].shape == frames.shape and float((out["image"] - frames).abs().max()) < 1e-6
    (mp4,) = host.output_files(entry, stream)
    info = probe_media(mp4)
    assert info.num_streams == 2 and (info.video.codec, info.audio.codec) == ("h264", "aac")
    assert info.video.frames == 49 and (info.video.width, info.video.height) == (128, 128)
    luma, ref = decode_video_gray(mp4).astype(np.float32), _luma(frames)
    assert luma.shape == ref.shape and float(np.abs(luma - ref).mean()) < 6.0
    assert _corr(luma, ref) > 0.95
    other = _luma(make_clip(seed + 1, 2, 128).video.permute(1, 2, 3, 0))
    assert _corr(luma, other) < 0.6  # negative control: another clip's frames
    # the generated sound: 2 s in the file, as the node returned it
    assert info.audio.duration == pytest.approx(2.0, abs=0.05) and info.audio.sample_rate == 24000
    wave_out = out["audio"][0].numpy()
    assert wave_out.shape[0] == 2 and wave_out.shape[1] >= 48000 and np.isfinite(wave_out).all()
    got = decode_audio(mp4, 24000, 2)
    k = min(got.shape[1], wave_out.shape[1])
    rms = float(np.sqrt((wave_out[:, :k] ** 2).mean()))
    assert float(np.sqrt(((got[:, :k] - wave_out[:, :k]) ** 2).mean())) < 0.1 * rms + 2e-3
    assert torch.isfinite(out["audio"]).all()


def _write_wav(path, seconds: float = 3.0, rate: int = 44100):
    """Stereo 16-bit test sound (stdlib only): left 440 Hz and right 660 Hz tone bursts at different times.
    Returns float [2, S] as written."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    env_l = (np.sin(2 * np.pi * 1.5 * t) > 0.3).astype(np.float64)
    env_r = (np.sin(2 * np.pi * 1.1 * t + 1.0) > 0.3).astype(np.float64)
    x = np.stack([0.4 * env_l * np.sin(2 * np.pi * 440 * t), 0.4 * env_r * np.sin(2 * np.pi * 660 * t)])
    pcm = np.round(x * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.T.tobytes())
    return pcm.astype(np.float32) / 32767


def test_a2v_example_runs_with_load_audio_on_tiny_models(host):
    """omniforcing_a2v on the tiny random-weight LTX-2 files: Load Audio reads example.wav from the input
    folder, the stream makes 2 s of video to it, and the file carries that sound, channel for channel."""
    from omniforcing_core.media import decode_audio, probe_media

    sound = _write_wav(host.base / "input" / "example.wav")
    g = tinyfy(load_api_workflow("omniforcing_a2v"), seconds=2)
    (load,) = nodes_of(g, "LoadAudio")
    (stream,) = nodes_of(g, "OmniForcingStream")
    assert g[load]["inputs"]["audio"] == "example.wav" and g[stream]["inputs"]["audio"] == [load, 0]
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    (mp4,) = host.output_files(entry, stream)
    info = probe_media(mp4)
    assert info.num_streams == 2 and info.video.frames == 49 and (info.video.width, info.video.height) == (64, 64)
    assert info.audio.sample_rate == 24000 and info.audio.duration == pytest.approx(2.0, abs=0.05)
    got = decode_audio(mp4, 44100, 2)
    n = min(got.shape[1], 2 * 44100)
    assert n >= 2 * 44100 - 2000
    assert _corr(got[0, :n], sound[0, :n]) > 0.95 and _corr(got[1, :n], sound[1, :n]) > 0.95
    assert abs(_corr(got[0, :n], sound[1, :n])) < 0.3  # left stays left
