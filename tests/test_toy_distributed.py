"""Issue #6: the training entry point under torchrun (2 CPU ranks, gloo): FSDP2 equals plain
data parallel, and an FSDP run resumed from its checkpoint equals an uninterrupted one bit for bit."""
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
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(TORCHRUN is None, reason="torchrun is not installed")]


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
