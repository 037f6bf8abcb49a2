"""A->V and V->A in a real ComfyUI on the embedded toy (no model files): the sampler and the stream node
take an AUDIO or IMAGE input, encode it with the given VAE, hold it clean, and the stream's outputs and
file carry that media itself."""
from __future__ import annotations

import pytest

from conftest import needs_comfyui
from host import error_text, load_api_workflow, nodes_of

pytestmark = needs_comfyui


def tensors(host, name):
    from safetensors.torch import load_file

    return load_file(str(host.output / "tensors" / f"{name}.safetensors"))


def _graph(seconds: int = 2):
    """The toy stream graph plus a 2 s toy clip (sampler + toy decode) whose IMAGE/AUDIO are the given media."""
    g = load_api_workflow("omniforcing_toy_stream")
    (toy,) = nodes_of(g, "OmniForcingToyModel")
    (enc,) = nodes_of(g, "OmniForcingToyTextEncode")
    (stream,) = nodes_of(g, "OmniForcingStream")
    base = dict(g[stream]["inputs"], seconds=seconds, seed=3, decode="balanced")
    g[stream]["inputs"] = dict(base, filename_prefix="omniforcing/plain")
    g["10"] = {"class_type": "OmniForcingSampler",
               "inputs": {k: base[k] for k in ("model", "positive", "width", "height", "seed", "steps", "window",
                                               "layout")} | {"seconds": 2, "seed": 11}}
    g["11"] = {"class_type": "OmniForcingToyDecode", "inputs": {"toy": [toy, 1], "latent": ["10", 0]}}
    g["12"] = {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": "given_media", "image": ["11", 0], "audio": ["11", 1]}}
    return g, toy, stream, base


def test_audio_and_video_inputs_drive_the_stream_and_the_sampler(host):
    import numpy as np
    import torch
    import torchaudio

    from omniforcing_core.media import decode_audio, decode_video_gray
    from omniforcing_core.toy.default import load_text_and_codecs
    from omniforcing_core.toy.encode import encode_audio

    g, toy, stream, base = _graph()
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
    g["40"] = {"class_type": "OmniForcingSampler",
               "inputs": dict(g["10"]["inputs"], seed=3, audio=["11", 1], audio_vae=[toy, 4])}
    g["41"] = {"class_type": "OmniForcingTestSaveTensors", "inputs": {"name": "a2v_latent", "latent": ["40", 0]}}
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    given, a2v, v2a, plain = (tensors(host, n) for n in ("given_media", "a2v", "v2a", "plain"))
    n = given["audio"].shape[-1]  # 2.01 s at 24 kHz stereo, the stream's own rate: nothing to resample
    assert a2v["audio"].shape[-1] >= n and torch.equal(a2v["audio"][..., :n], given["audio"])  # sample for sample
    assert not torch.allclose(plain["audio"][..., :n], given["audio"], atol=1e-2)  # negative control
    assert torch.equal(v2a["image"], given["image"])  # the given frames themselves (same size and rate)
    assert not torch.allclose(plain["image"], given["image"], atol=1e-2)
    assert not torch.allclose(a2v["image"], plain["image"], atol=1e-3)  # the video followed the given audio
    # the files carry the same media (AAC / H.264 round trips)
    (mp4,) = host.output_files(entry, "20")
    got = decode_audio(mp4, 24000, 2)[:, :n]
    want = given["audio"][0].numpy()[:, :got.shape[-1]]
    assert float(np.sqrt(((got - want) ** 2).mean()) / np.sqrt((want ** 2).mean())) < 0.05
    (mp4,) = host.output_files(entry, "30")
    luma = decode_video_gray(mp4).astype(np.float32)
    ref = (given["image"][..., :3] * torch.tensor([0.299, 0.587, 0.114])).sum(-1).numpy() * 255
    assert luma.shape == ref.shape and float(np.abs(luma - ref).mean()) < 6.0
    # the offline sampler holds the audio VAE's encode of the input (ComfyUI's protocol: resampled to the
    # VAE's 16 kHz), computed here by the core's toy encoder; the last latents see the end padding
    lat = tensors(host, "a2v_latent")["audio_latent"]
    wave = torchaudio.functional.resample(given["audio"], 24000, 16000).mean(1)
    want = encode_audio(load_text_and_codecs()[1], wave[:, :wave.shape[-1] // 640 * 640])
    assert lat.shape == (1, 8, 51, 16)
    assert float((lat[:, :, :48] - want[:, :, :48]).abs().max()) < 1e-4


@pytest.mark.parametrize("field,extra,needle", [
    ("audio", {"seconds": 3}, "the audio input is 2.01 s long, shorter than the 3 s asked: ask for at most 2 s"),
    ("video", {"seconds": 3}, "the video input is 2.04 s long, shorter than the 3 s asked: ask for at most 2 s"),
    ("both", {}, "give either 'audio' (audio -> video) or 'video' (video -> audio), not both"),
])
def test_given_input_errors_name_the_fix(host, field, extra, needle):
    g, toy, stream, base = _graph()
    media = {"audio": {"audio": ["11", 1]}, "video": {"video": ["11", 0]},
             "both": {"audio": ["11", 1], "video": ["11", 0]}}[field]
    g[stream]["inputs"] = dict(g[stream]["inputs"], **media, **extra)
    entry = host.run(g)
    assert entry["status"]["status_str"] == "error"
    assert needle in error_text(entry), error_text(entry)
