"""docs/api.md runs: every ```python block, in order, in one namespace, against tiny random stand-ins
written under the file names the page uses (an LTX-2-style base with text connectors and a foreign
LTX-2 header; a header-less sharded generator like the released one)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from omniforcing_core.checkpoint import save_safetensors
from omniforcing_core.config import TINY, TINY_WITH_CONNECTORS
from omniforcing_core.embedded import random_model

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def write_stand_ins(root: Path) -> None:
    base = random_model(TINY_WITH_CONNECTORS, seed=1)
    c = base.config
    header = {  # an LTX-2-style header (the real one's convention keys), with the tiny model's head counts
        "num_attention_heads": c.video_heads, "attention_head_dim": c.video_head_dim,
        "audio_num_attention_heads": c.audio_heads, "audio_attention_head_dim": c.audio_head_dim,
        "connector_num_attention_heads": c.connectors.heads, "connector_attention_head_dim": c.connectors.head_dim,
        "rope_type": "split", "frequencies_precision": "float64", "av_ca_timestep_scale_multiplier": 1000.0,
        "causal_temporal_positioning": True, "use_middle_indices_grid": True}
    save_safetensors(dict(base.state_dict()), root / "ltx-2-19b-dev.safetensors", prefix="model.diffusion_model.",
                     metadata={"config": json.dumps({"transformer": header})})
    gen = random_model(TINY, seed=2)
    save_safetensors(dict(gen.state_dict()), root / "omniforcing_ltx2_5s_causal", shards=2)


def test_every_api_example_runs(tmp_path, monkeypatch, capsys):
    blocks = code_blocks(DOC.read_text())
    assert len(blocks) >= 6, "docs/api.md lost its examples"
    write_stand_ins(tmp_path)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"docs/api.md block {i + 1}", "exec"), ns)
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"docs/api.md block {i + 1} failed: {type(e).__name__}: {e}\n{code}") from e
    out = capsys.readouterr().out
    assert "omniforcing-student" in out and "gate_timestep" in out
    # what the page promises, checked on what it computed
    assert ns["report"].conventions.values.preset == "omniforcing-student"
    assert ns["report"].config_source["video_heads"] == "header"
    assert tuple(ns["video_out"].shape) == tuple(ns["video_latents"].shape)
    assert torch.isfinite(ns["video_out"]).all() and torch.isfinite(ns["audio_out"]).all()
