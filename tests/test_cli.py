"""The command line, run in process through its own `main` (the README's main job keeps one real
subprocess smoke test in test_streaming)."""
import json
from types import SimpleNamespace

import pytest

from omniforcing_core.checkpoint import save_safetensors
from omniforcing_core.cli import main
from omniforcing_core.config import TINY
from omniforcing_core.embedded import random_model
from omniforcing_core.loader import header_for

@pytest.fixture
def cli(capsys):
    def run(*args):
        code = main(list(args))
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


def test_keys_prints_every_ltx2_key_with_shape_without_allocating(cli):
    r = cli("keys", "--config", "ltx2-19b", "--compact", "--prefix", "model.diffusion_model.")
    assert r.returncode == 0, r.stderr
    keys = json.loads(r.stdout)
    assert len(keys) == 3510
    assert keys["model.diffusion_model.transformer_blocks.47.audio_ff.net.2.weight"] == [2048, 8192]
    assert "18,876,174,592 parameters" in r.stderr


def test_info_on_a_sharded_tiny_checkpoint(tmp_path, cli):
    m = random_model(TINY.replace(num_audio_sinks=2), seed=0)
    idx = save_safetensors(dict(m.state_dict()), tmp_path / "gen", prefix="model.diffusion_model.", shards=3,
                           metadata={"config": json.dumps({"transformer": header_for(m.config)})})
    r = cli("info", str(idx))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["key_prefix"] == "model.diffusion_model."
    assert len(info["files"]) == 3 and info["tensors"] == len(m.state_dict())
    assert info["parameters"] == sum(v.numel() for v in m.state_dict().values())
    assert info["layout"] == "prefix" and info["audio_sink_tokens"] == 2
    assert info["conventions"]["rope"] == "interleaved" and info["dtypes"] == {"F32": len(m.state_dict())}


def test_info_on_a_bad_file_is_a_clear_error(tmp_path, cli):
    (tmp_path / "x.safetensors").write_bytes(b"12345678")
    r = cli("info", str(tmp_path / "x.safetensors"))
    assert r.returncode == 2 and "error:" in r.stderr and "safetensors" in r.stderr


def test_bench_arguments_are_checked_not_defaulted(capsys):
    """0 blocks, an unknown dtype or mode, and a bad size are errors naming the fix, before any model is built."""
    for argv, needle in ((["--blocks", "0"], "give 1 or more"), (["--dtype", "fp7"], "invalid choice"),
                         (["--modes", "rolling,fast"], "unknown mode"), (["--height", "-3"], "give 1 or more")):
        with pytest.raises(SystemExit) as e:
            main(["bench", *argv])
        assert e.value.code == 2 and needle in capsys.readouterr().err
    assert main(["bench", "--height", "100", "--width", "130"]) == 2
    err = capsys.readouterr().err
    assert "nearest valid width is 128" in err and "nearest valid height is 96" in err
