"""Conventions are one explicit object, resolved field by field with provenance; head counts are never
guessed (header, a known architecture recognised by its full signature, or an explicit override)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omniforcing_core.checkpoint import CheckpointError, KeyMap, TensorRef, save_safetensors, scan
from omniforcing_core.cli import main as cli
from omniforcing_core.config import (CONVENTION_FIELDS, LTX2_19B_WITH_CONNECTORS, PRESETS, TINY,
                                     TINY_WITH_CONNECTORS, Conventions, get_preset)
from omniforcing_core.embedded import random_model
from omniforcing_core.loader import (describe_config, header_for, load_model, recognise_architecture,
                                     resolve_conventions)
from omniforcing_core.model import OmniForcingTransformer

LTX_HEADER = {"rope_type": "split", "frequencies_precision": "float64", "av_ca_timestep_scale_multiplier": 1000.0,
              "causal_temporal_positioning": True, "use_middle_indices_grid": True}


def _heads(cfg) -> dict:
    h = {"num_attention_heads": cfg.video_heads, "attention_head_dim": cfg.video_head_dim,
         "audio_num_attention_heads": cfg.audio_heads, "audio_attention_head_dim": cfg.audio_head_dim}
    if cfg.connectors:
        h["connector_num_attention_heads"] = cfg.connectors.heads
    return h


def _write(path: Path, cfg, header: dict | None, prefix="", seed=0) -> Path:
    meta = None if header is None else {"config": json.dumps({"transformer": header})}
    return save_safetensors(dict(random_model(cfg, seed=seed).state_dict()), path, prefix=prefix, metadata=meta)


def test_presets_are_complete_distinct_and_validated():
    assert set(PRESETS) == {"omniforcing-student", "ltx-core", "comfyui"}
    for name, p in PRESETS.items():
        assert set(p.as_dict()) == set(CONVENTION_FIELDS) and p.preset == name
    assert Conventions() == get_preset("omniforcing-student")
    diff = get_preset("ltx-core").differences(get_preset("comfyui"))
    assert {"rope_kind", "gate_timestep", "v2a_norm", "qk_norm_eps", "causal_fix", "positions"} <= set(diff)
    with pytest.raises(ValueError, match="gate_timestep='newest' unknown"):
        Conventions(gate_timestep="newest")
    with pytest.raises(ValueError, match="qk_norm_eps"):
        Conventions(qk_norm_eps=0)
    with pytest.raises(ValueError, match="unknown conventions preset 'comfy'"):
        get_preset("comfy")


def test_config_round_trips_its_conventions():
    for name, p in PRESETS.items():
        cfg = TINY.with_conventions(name)
        assert cfg.conventions == p and TINY.with_conventions(p) == cfg
        assert cfg.rope.kind == p.rope_kind and cfg.av_ca_timestep_scale_multiplier == p.av_ca_timestep_scale_multiplier
    m = OmniForcingTransformer(TINY_WITH_CONNECTORS.with_conventions("comfyui"))
    eps = {mod.eps for n, mod in m.named_modules() if n.endswith(("q_norm", "k_norm"))}
    assert eps == {1e-5}  # every q/k norm, the text connectors' too


def test_resolution_order_override_header_preset(tmp_path):
    base = _write(tmp_path / "base.safetensors", TINY, {**_heads(TINY), **LTX_HEADER})
    conv = resolve_conventions(scan(base), None, None)  # a foreign LTX-2 header alone: ltx-core, header fields
    assert conv.values == get_preset("ltx-core") and conv.based_on == "ltx-core"
    assert conv.source["rope_kind"] == "base header" and conv.source["gate_timestep"].startswith("ltx-core preset")
    conv = resolve_conventions(scan(base), None, {"preset": "comfyui", "qk_norm_eps": 1e-6})
    assert conv.values.gate_timestep == "other-max" and conv.source["gate_timestep"] == "override (preset)"
    assert conv.values.rope_kind == "split" and conv.source["rope_kind"] == "base header"  # header beats preset
    assert conv.values.qk_norm_eps == 1e-6 and conv.source["qk_norm_eps"] == "override"
    gen = _write(tmp_path / "gen.safetensors", TINY, None, seed=1)
    conv = resolve_conventions(scan(base), scan(gen), None)  # a generator: the student's, not the base header's
    assert conv.values == get_preset("omniforcing-student")
    assert set(conv.source.values()) == {"OmniForcing student default"}
    with pytest.raises(ValueError, match="unknown convention override"):
        resolve_conventions(scan(base), None, {"rope": "split"})


def test_our_older_headers_keep_the_student_conventions(tmp_path):
    """Headers we wrote before the complete conventions entry (the shipped toy student's) have rope_type,
    frequencies_precision and the gate multiplier but no LTX-2 position keys: not a foreign LTX-2 header."""
    old = {**_heads(TINY), "rope_type": "interleaved", "frequencies_precision": "float32",
           "av_ca_timestep_scale_multiplier": 1.0, "timestep_scale_multiplier": 1000.0}
    p = _write(tmp_path / "old.safetensors", TINY, old)
    conv = resolve_conventions(scan(p), None, None)
    assert conv.values == get_preset("omniforcing-student") and conv.based_on == "omniforcing-student"
    assert conv.source["rope_kind"] == "base header" and conv.source["gate_timestep"] == "default"


def test_files_we_write_carry_their_complete_conventions(tmp_path):
    custom = TINY.with_conventions(get_preset("ltx-core").replace(gate_timestep="own", qk_norm_eps=1e-5))
    p = _write(tmp_path / "m.safetensors", custom, header_for(custom))
    m, rep = load_model(p)
    assert m.config == custom and rep.conventions.values == custom.conventions
    assert rep.conventions.values.preset is None and set(rep.conventions.source.values()) == {"base header"}


def test_header_less_files_need_head_counts_unless_a_known_architecture(tmp_path):
    p = _write(tmp_path / "tiny.safetensors", TINY, None, prefix="model.")
    with pytest.raises(CheckpointError) as e:
        load_model(p)
    msg = str(e.value)
    assert "video head count (width 32)" in msg and "audio head count (width 16)" in msg
    assert "--video-heads N" in msg and "architecture=" in msg and "'heads' widget" in msg and "connector" not in msg
    m, rep = load_model(p, architecture={"video_heads": 2, "audio_heads": 2})
    assert (m.config.video_heads, m.config.audio_heads) == (2, 2)
    assert rep.config_source["video_heads"] == "override" and rep.config_source["num_layers"] == "tensor shapes"
    with pytest.raises(CheckpointError, match="do not make its width 32"):
        load_model(p, architecture={"video_heads": 3, "audio_heads": 2})
    half = _write(tmp_path / "half.safetensors", TINY, {"attention_head_dim": 16, "audio_num_attention_heads": 2})
    m, rep = load_model(half)  # either of heads / head_dim determines the other
    assert (m.config.video_heads, m.config.audio_head_dim) == (2, 8) and rep.config_source["video_heads"] == "header"


def test_connector_heads_are_never_guessed(tmp_path):
    p = _write(tmp_path / "c.safetensors", TINY_WITH_CONNECTORS, _heads(TINY))  # header without connector heads
    with pytest.raises(CheckpointError, match=r"text connector head count \(width 24\).*--connector-heads N"):
        load_model(p)
    m, rep = load_model(p, architecture={"connector_heads": 2})
    assert m.config.connectors.heads == 2 and rep.config_source["connector_heads"] == "override"


def _signature_keymap(cfg, prefix="model.", sinks=0, drop_connectors=False) -> KeyMap:
    with torch.device("meta"):
        sd = OmniForcingTransformer(cfg.replace(num_audio_sinks=sinks)).state_dict()
    refs = {k: TensorRef(Path("x.safetensors"), prefix + k, "BF16", tuple(v.shape)) for k, v in sd.items()
            if not (drop_connectors and "embeddings_connector." in k)}
    return KeyMap(refs, prefix, [])


def test_ltx2_19b_is_recognised_by_its_full_signature():
    for km in (_signature_keymap(LTX2_19B_WITH_CONNECTORS), _signature_keymap(LTX2_19B_WITH_CONNECTORS, sinks=16),
               _signature_keymap(LTX2_19B_WITH_CONNECTORS, drop_connectors=True)):
        assert recognise_architecture(km.refs) == "LTX-2 19B"
        cfg, src = describe_config(km, get_preset("omniforcing-student"), "19b")
        assert (cfg.video_heads, cfg.video_head_dim, cfg.audio_heads, cfg.audio_head_dim) == (32, 128, 32, 64)
        assert src["video_heads"] == "known architecture LTX-2 19B"
    cfg, src = describe_config(_signature_keymap(LTX2_19B_WITH_CONNECTORS), get_preset("ltx-core"), "19b")
    assert (cfg.connectors.heads, cfg.connectors.head_dim) == (30, 128) and src["connector_heads"].startswith("known")
    km = _signature_keymap(LTX2_19B_WITH_CONNECTORS, drop_connectors=True)
    odd = dict(km.refs)
    odd["transformer_blocks.3.ff.net.2.bias"] = TensorRef(Path("x"), "k", "BF16", (4095,))
    assert recognise_architecture(odd) is None  # one shape off: not recognised, so no head counts assumed
    with pytest.raises(CheckpointError, match="cannot determine the video head count"):
        describe_config(KeyMap(odd, "model.", []), get_preset("omniforcing-student"), "odd")


def test_info_prints_where_each_value_came_from(tmp_path, capsys):
    p = _write(tmp_path / "tiny.safetensors", TINY, None, prefix="model.")
    assert cli(["info", str(p)]) == 2 and "--video-heads N --audio-heads N" in capsys.readouterr().err
    assert cli(["info", str(p), "--video-heads", "2", "--audio-heads", "2", "--preset", "comfyui",
                "--convention", "causal_fix=true"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config_from"]["heads"] == {"video": "override", "audio": "override"}
    assert info["conventions"]["gate_timestep"] == "other-max" and info["conventions"]["causal_fix"] is True
    assert info["conventions"]["from"]["causal_fix"] == "override" and info["conventions"]["preset"] is None
    assert info["known_architecture"] is None


# -- what each convention does -----------------------------------------------------------------------------

def _outputs(cfg, video_sigma, audio_sigma, seed=0):
    m = random_model(cfg, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    v, a = torch.randn(2, 128, 3, 2, 2, generator=g, dtype=torch.float64), \
        torch.randn(2, 8, 20, 16, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 5, cfg.caption_channels, generator=g, dtype=torch.float64)
    with torch.no_grad():
        return m(v, a, video_sigma, audio_sigma, m.text_kv(ctx, ctx))


@pytest.mark.parametrize("multiplier", [1.0, 1000.0])
def test_gate_timestep_rules(multiplier):
    """The A2V/V2A gate AdaLN sees (sigma * 1000) * (multiplier / 1000), where sigma is each modality's own
    per-frame sigma (own), the other modality's per-sample maximum (other-sample), or the other modality's
    maximum over the whole batch (other-max)."""
    vs = torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.7, 0.1]])
    as_ = torch.rand(2, 20, generator=torch.Generator().manual_seed(3)) * 0.8
    expect = {"own": (vs, as_), "other-sample": (as_.amax(1, keepdim=True), vs.amax(1, keepdim=True)),
              "other-max": (as_.amax().expand(2, 1), vs.amax().expand(2, 1))}
    for rule, (v_in, a_in) in expect.items():
        m = random_model(TINY.with_conventions(Conventions(gate_timestep=rule,
                                                           av_ca_timestep_scale_multiplier=multiplier)), seed=0)
        c = m._conditioning(vs, as_, 0, 4, torch.float32)
        f = multiplier / 1000.0
        want_v = m.av_ca_a2v_gate_adaln_single(v_in * 1000.0 * f, torch.float32)[0][:, :, 0]
        want_a = m.av_ca_v2a_gate_adaln_single(a_in * 1000.0 * f, torch.float32)[0][:, :, 0]
        assert torch.equal(c.v_gate, want_v) and torch.equal(c.a_gate, want_a), rule
    outs = {r: _outputs(TINY.with_conventions(Conventions(gate_timestep=r)), vs, as_) for r in expect}
    assert not torch.allclose(outs["own"][0], outs["other-sample"][0])
    assert not torch.allclose(outs["other-sample"][1], outs["other-max"][1])


def test_v2a_after_a2v_differs():
    vs, as_ = torch.tensor([0.7, 0.4]), torch.tensor([0.7, 0.4])
    before = _outputs(TINY.with_conventions(Conventions(v2a_norm="before-a2v")), vs, as_)
    after = _outputs(TINY.with_conventions(Conventions(v2a_norm="after-a2v")), vs, as_)
    assert torch.equal(before[0], after[0]) is False and not torch.allclose(before[1], after[1])
