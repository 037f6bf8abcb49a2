"""Issue #6: the training entry point under torchrun (2 CPU ranks, gloo): FSDP2 equals plain
data parallel, and an FSDP run resumed from its checkpoint equals an uninterrupted one bit for bit.
In process: the distributed helpers without torchrun, and with a one-rank gloo group."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omniforcing_core.toy.codecs import Codecs
from omniforcing_core.toy.stages import build_dataset

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
pytestmark = pytest.mark.usefixtures("one_thread")
needs_torchrun = pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    build_dataset(root / "data", Codecs(), 4, seed=0, size=64, log=lambda *a: None)
    return root / "data"


def _train(run: Path, data: Path, steps: int, fsdp: bool, *extra: str) -> None:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "omniforcing_core.toy", "train",
           "--stage", "teacher", "--run-dir", str(run), "--data", str(data), "--steps", str(steps),
           "--batch", "2", *extra, "--set", "size=64", "log_every=100", "save_every=100", f"fsdp={str(fsdp).lower()}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def _weights(run: Path) -> dict:
    return {k: v for k, v in load_file(str(run / "ckpt.safetensors")).items() if not k.startswith("optim.")}


@needs_torchrun
def test_fsdp_equals_data_parallel_and_resumes_bit_exactly(data, tmp_path):
    _train(tmp_path / "ddp", data, 3, False)
    _train(tmp_path / "fsdp", data, 3, True)
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "fsdp")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # same training, other reduction order
    assert not (tmp_path / "ddp" / "optim.rank0.safetensors").exists()
    assert (tmp_path / "fsdp" / "optim.rank1.safetensors").is_file()  # sharded optimiser state per rank
    _train(tmp_path / "cut", data, 3, True, "--max-steps", "2")
    _train(tmp_path / "cut", data, 3, True)
    c = _weights(tmp_path / "cut")
    assert all(torch.equal(b[k], c[k]) for k in b)
    for r in (0, 1):
        x = load_file(str(tmp_path / "fsdp" / f"optim.rank{r}.safetensors"))
        y = load_file(str(tmp_path / "cut" / f"optim.rank{r}.safetensors"))
        assert all(torch.equal(x[k], y[k]) for k in x)


def _grads(n: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.zeros(3, 4)) for _ in range(n)]
    for p in ps:
        p.grad = torch.randn(3, 4, generator=g)
    return ps


def test_single_process_environment_and_clipping(monkeypatch):
    from omniforcing_core.toy.distributed import clip_gradients, current_rank, dist_env
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert dist_env() == (0, 1, "cuda:0" if torch.cuda.is_available() else "cpu")
    assert current_rank() == 0
    ours, ref = _grads(3), _grads(3)
    norm = clip_gradients(ours, 0.5, world=1)
    assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(ref, 0.5)), rel=1e-6) and norm > 1
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(ours, ref))
    assert torch.cat([p.grad.flatten() for p in ours]).norm() == pytest.approx(0.5, rel=1e-4)
    free = _grads(3)
    clip_gradients(free, 0.0, world=1)  # max_norm 0: measured, not clipped
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(free, _grads(3)))


def test_one_rank_fsdp_shards_every_block_and_changes_nothing(tmp_path):
    """shard_model and the sharded branch of clip_gradients in this process, under a one-rank gloo group:
    the sharded model computes what the plain one does, and clips to the same gradients."""
    import copy

    import torch.distributed as dist
    from omniforcing_core.layout import make_clip, make_layout
    from omniforcing_core.model import OmniForcingTransformer
    from omniforcing_core.toy.configs import TOY_MODEL
    from omniforcing_core.toy.distributed import clip_gradients, current_rank, is_dtensor, is_sharded, shard_model
    torch.manual_seed(0)
    ref = OmniForcingTransformer(TOY_MODEL)
    model = copy.deepcopy(ref)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert not is_sharded(model)
        shard_model(model)
        assert is_sharded(model) and current_rank() == 0
        assert all(type(b).__name__.startswith("FSDP") for b in model.transformer_blocks)
        assert all(is_dtensor(p) for p in model.parameters())
        clip = make_clip(make_layout("v2"), 64, 64, seconds=1)
        v, a = torch.randn(clip.video_shape()), torch.randn(clip.audio_shape())
        ctx = torch.randn(1, 3, TOY_MODEL.caption_channels)
        out = model(v, a, 0.5, 0.5, model.text_kv(ctx, ctx), None)[0]  # text_kv: a registered forward method
        want = ref(v, a, 0.5, 0.5, ref.text_kv(ctx, ctx), None)[0]
        assert torch.allclose(out, want, rtol=0, atol=1e-6)
        out.square().mean().backward()
        want.square().mean().backward()
        norm = clip_gradients(list(model.parameters()), 1e-3, world=1)
        assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1e-3)), rel=1e-5)
        got = dict(model.named_parameters())
        for k, p in ref.named_parameters():
            g = got[k].grad
            assert (g is None) == (p.grad is None), k
            if g is not None:
                assert torch.allclose(g.full_tensor(), p.grad, rtol=1e-5, atol=1e-9), k
    finally:
        dist.destroy_process_group()
