"""Issue #6: the shipped default (`toy.default.load_default`) - trained toy student when shipped, random fallback."""
import json

import pytest
import torch

from omniforcing_core import embedded
from omniforcing_core.config import get_config
from omniforcing_core.layout import make_clip
from omniforcing_core.toy import default
from omniforcing_core.sampling import generate


pytestmark = pytest.mark.usefixtures("one_thread")


def _check(d):
    clip = make_clip(d.layout, d.size, d.size, num_blocks=2)
    v, a = generate(d.model, clip, d.text("a red ball bounces twice"))
    frames = d.decode_video(v)
    wav = d.decode_audio(a)
    assert frames.shape == (1, 3, clip.num_frames, d.size, d.size)
    assert 0 <= float(frames.min()) and float(frames.max()) <= 1
    assert wav.shape == (1, 2, (4 * a.shape[2] - 3) * 240)
    return v, a


def test_random_fallback_without_assets(tmp_path):
    d = default.load_default(assets=tmp_path)
    assert not d.trained and d.codecs is None and d.text_encoder is None
    assert d.model.config.num_layers == get_config("tiny").num_layers
    _check(d)
    # the existing API is unchanged
    m = embedded.random_model("tiny")
    assert embedded.toy_text(m, "x").batch == 1


def _fake_run(tmp_path):
    """A run dir shaped like a Stage II/III result (random weights), and codecs, for the export path."""
    from safetensors.torch import save_file
    from omniforcing_core.model import OmniForcingTransformer
    from omniforcing_core.toy.codecs import Codecs
    from omniforcing_core.toy.configs import toy_config
    from omniforcing_core.toy.textenc import TextEncoder
    cfg = toy_config("causal")
    torch.manual_seed(0)
    m, te = OmniForcingTransformer(cfg.model_config()), TextEncoder(cfg.model_config().caption_channels)
    run = tmp_path / "run"
    run.mkdir()
    t = {f"model.{k}": v.contiguous() for k, v in m.state_dict().items()}
    t.update({f"text.{k}": v.contiguous() for k, v in te.state_dict().items()})
    save_file(t, str(run / "ckpt.safetensors"))
    (run / "state.json").write_text(json.dumps({"config": cfg.to_dict(), "step": 0}))
    c = Codecs()
    save_file({k: v.contiguous() for k, v in c.state_dict().items()}, str(tmp_path / "codecs.safetensors"))
    return run, m, te, c


def test_export_then_load_default_round_trip(tmp_path):
    from omniforcing_core.loader import load_model
    from omniforcing_core.toy.report import export_assets
    run, m, te, c = _fake_run(tmp_path)
    sizes = export_assets(run, tmp_path / "codecs.safetensors", tmp_path / "assets")
    assert sum(sizes.values()) < 16 * 2 ** 20  # fp32, exact: 12 MB for the 4-layer 128/64 student + codecs
    d = default.load_default(assets=tmp_path / "assets")
    assert d.trained and d.layout.kind == "v2" and d.size == 128
    for k, v in m.state_dict().items():
        assert torch.equal(d.model.state_dict()[k], v)
    z = torch.randn(1, 128, 4, 2, 2)
    for k, v in c.state_dict().items():
        if ".dec." in f".{k}" or ".enc." in f".{k}" or "latent_" in k:
            assert torch.equal(d.codecs.state_dict()[k], v)  # encoders and decoders shipped bit-exactly
    assert torch.allclose(d.codecs.video.decode(z), c.video.decode(z), atol=1e-6)
    _check(d)
    # the same file loads through the core loader (what the ComfyUI loader node uses)
    lm, rep = load_model(tmp_path / "assets" / "toy_student.safetensors")
    assert rep.config.num_layers == m.config.num_layers
    for k, v in m.state_dict().items():
        assert torch.equal(lm.state_dict()[k], v)


@pytest.mark.skipif(not default.has_trained_assets(), reason="no shipped assets yet")
def test_shipped_default_is_the_trained_student():
    d = default.load_default()
    assert d.trained
    _check(d)


def test_core_does_not_import_the_toy_package():
    import ast
    from pathlib import Path
    core = Path(embedded.__file__).parent
    for path in core.glob("*.py"):
        if path.name in ("demo.py", "cli.py", "__main__.py"):  # entry points may run the toy default
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level and (node.module or "").split(".")[0] == "toy":
                raise AssertionError(f"{path.name} imports the toy package")


def test_toy_decoders_state_their_reach_and_stream_the_whole_decode():
    """The toy codecs' reach is data (not probed): video per latent; audio one latent each side (the
    vocoder's grains are phase-locked to latent boundaries). Both stream to the whole decode exactly."""
    from harness.decode import stream_vs_offline
    from omniforcing_core.decode import probe_reach
    from omniforcing_core.toy.codecs import Codecs
    torch.manual_seed(0)
    v, a = default.toy_decoders(Codecs().eval())
    assert v.reach == default.VIDEO_REACH == probe_reach(v, torch.randn(1, 128, 7, 1, 1)).reach
    assert a.reach == default.AUDIO_REACH and a.crossfade == 0
    assert stream_vs_offline(v, torch.randn(1, 128, 10, 1, 1), (4, 3)).max_abs < 1e-6
    assert stream_vs_offline(a, 2 * torch.randn(1, 8, 26, 16), (4, 3)).max_abs < 1e-5
