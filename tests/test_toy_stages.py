"""Issue #6 smoke tests: every stage runs a few steps on a minute scale, losses go down, checkpoints
reload bit-exactly, a resumed run equals an uninterrupted one."""
import dataclasses
import json
import math

import pytest
import torch

from omniforcing_core.toy.codecs import Codecs
from omniforcing_core.toy.configs import CONFIG_DIR, TOY_MODEL, StageConfig, load_named, toy_config
from omniforcing_core.toy.stages import BidirectionalDMDStage, CausalStage, TeacherStage, build_dataset, make_ode_pairs
from omniforcing_core.toy.train import Runner, load_checkpoint


pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(size=64, log_every=1000, save_every=1000)


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    codecs = Codecs()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in codecs.state_dict().items()}, str(root / "codecs.safetensors"))
    build_dataset(root / "data", codecs, 6, seed=0, size=64, log=_quiet)
    tcfg = toy_config("teacher", data=str(root / "data"), steps=3, batch=2, **SMALL)
    Runner(tcfg, root / "teacher", log=_quiet).run()
    ocfg = toy_config("ode", data=str(root / "data"), teacher=str(root / "teacher"), num_pairs=3, batch=3,
                      teacher_steps=6, size=64)
    make_ode_pairs(ocfg, root / "ode", log=_quiet)
    return root


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_loss_goes_down(toy):
    cfg = toy_config("teacher", data=str(toy / "data"), steps=12, batch=4, lr=3e-3, warmup=0, **SMALL)
    st = TeacherStage(cfg)
    before = st.eval_loss()
    for i in range(12):
        st.step(i)
    assert st.eval_loss() < before


def test_checkpoint_reload_is_bit_exact(toy, tmp_path):
    cfg = toy_config("teacher", data=str(toy / "data"), steps=2, batch=2, **SMALL)
    r = Runner(cfg, tmp_path / "run", log=_quiet)
    r.run()
    fresh = TeacherStage(cfg)
    state = load_checkpoint(tmp_path / "run", fresh)
    assert state["step"] == 2
    for name, mod in r.stage.modules().items():
        assert _states_equal(mod.state_dict(), fresh.modules()[name].state_dict())
    a, b = r.stage.opt.state_dict(), fresh.opt.state_dict()
    for pid in a["state"]:
        assert _states_equal(a["state"][pid], b["state"][pid])
    assert a["param_groups"] == b["param_groups"]


def test_resumed_run_equals_uninterrupted_run(toy, tmp_path):
    cfg = toy_config("teacher", data=str(toy / "data"), steps=4, batch=2, **SMALL)
    a = Runner(cfg, tmp_path / "a", log=_quiet)
    a.run()
    Runner(cfg, tmp_path / "b", log=_quiet).run(max_steps=2)
    b = Runner(cfg, tmp_path / "b", log=_quiet)
    b.run()
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 4
    assert _states_equal(a.stage.model.state_dict(), b.stage.model.state_dict())
    assert _states_equal(a.stage.textenc.state_dict(), b.stage.textenc.state_dict())


def test_ode_pairs_hold_the_student_sigmas(toy):
    from safetensors.torch import load_file
    t = load_file(str(toy / "ode" / "pairs.safetensors"))
    assert t["video"].shape == (3, 5, 128, 7, 2, 2) and t["audio"].shape == (3, 5, 8, 51, 16)
    assert torch.allclose(t["sigmas"], torch.tensor([1.0, 0.906229, 0.726524, 0.420719, 0.0]), atol=1e-5)
    assert t["video"][:, 0].float().std() > 0.5  # entry 0 = pure noise


def test_causal_stage_loss_goes_down_v2_and_prefix_sinks(toy):
    for kw in (dict(), dict(layout="prefix", num_sinks=2), dict(layout="prefix", num_sinks=2,
                                                               sink_positions="incremental")):
        cfg = toy_config("causal", data=str(toy / "ode"), init=str(toy / "teacher"), steps=10, batch=3, lr=2e-3,
                         **SMALL, **kw)
        st = CausalStage(cfg)
        before = st.eval_loss(2)
        for i in range(10):
            st.step(i)
        assert st.eval_loss(2) < before, kw


def test_dmd_stage_runs_with_kv_rollout_and_reloads(toy, tmp_path):
    ccfg = toy_config("causal", data=str(toy / "ode"), init=str(toy / "teacher"), steps=2, batch=2, **SMALL)
    Runner(ccfg, tmp_path / "causal", log=_quiet).run()
    cfg = toy_config("dmd", data=str(toy / "data"), init=str(tmp_path / "causal"), teacher=str(toy / "teacher"),
                     steps=3, batch=2, gen_every=2, ema_start=1, lr=1e-3, **SMALL)
    r = Runner(cfg, tmp_path / "dmd", log=_quiet)
    r.run()
    st = json.loads((tmp_path / "dmd" / "state.json").read_text())
    m = st["metrics"]
    assert "dmd" in m[0] and "dmd" not in m[1] and "dmd" in m[2]  # generator every gen_every steps
    assert all(torch.isfinite(torch.tensor(x["critic"])) for x in m)
    init = CausalStage(ccfg)  # the generator moved away from its Stage II init
    load_checkpoint(tmp_path / "causal", init)
    assert not _states_equal(init.model.state_dict(), r.stage.model.state_dict())
    fresh = type(r.stage)(cfg)
    load_checkpoint(tmp_path / "dmd", fresh)
    for name in ("model", "critic", "ema"):
        assert _states_equal(r.stage.modules()[name].state_dict(), fresh.modules()[name].state_dict())


def test_dmd_with_a_given_modality_holds_it_clean_and_scores_only_the_other(toy, tmp_path):
    from omniforcing_core.sampling import Given
    from omniforcing_core.toy.stages import DMDStage
    ccfg = toy_config("causal", data=str(toy / "ode"), init=str(toy / "teacher"), steps=1, batch=2, **SMALL)
    Runner(ccfg, tmp_path / "causal", log=_quiet).run()
    cfg = toy_config("dmd", data=str(toy / "data"), init=str(tmp_path / "causal"), teacher=str(toy / "teacher"),
                     steps=4, batch=2, gen_every=1, given_share=1.0, **SMALL)
    st = DMDStage(cfg)
    idx = torch.tensor([0, 1])
    assert {st._given(i, idx).modality for i in range(16)} == {"video", "audio"}
    assert DMDStage(dataclasses.replace(cfg, given_share=0.0))._given(0, idx) is None
    c = st.model.config.caption_channels
    g = torch.Generator().manual_seed(0)
    text = st.model.text_kv(torch.randn(2, 4, c, generator=g), torch.randn(2, 4, c, generator=g))
    given = Given("video", st.data["video"][idx].float())
    xv, xa, _ = st.rollout(text, g, 0, grad=False, given=given)
    assert torch.equal(xv, given.latents)  # held clean through the rollout
    xv0, _, _ = st.rollout(text, g, 0, grad=False)
    assert not torch.allclose(xv0, given.latents)  # negative control: without it the video is generated
    s = torch.full((2,), 0.5)
    (nv, na), (sv, sa) = st._hold(given, (xv, xa), (xv + 1, xa + 1), s)
    assert torch.equal(nv, xv) and torch.equal(na, xa + 1) and sv.eq(0).all() and torch.equal(sa, s)
    for i in range(4):
        out = st.step(i)
        mode = st._given(i, idx).modality
        assert out[f"dmd_{mode}"] == 0.0 and out[f"dmd_{'audio' if mode == 'video' else 'video'}"] > 0
        assert math.isfinite(out["critic"])


def test_shipped_stage_configs_round_trip_and_hold_only_fields_the_code_reads():
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    assert names == ["toy_causal", "toy_dmd", "toy_ode", "toy_teacher"]
    fields = {f.name for f in dataclasses.fields(StageConfig)}
    for n in names:
        assert set(json.loads((CONFIG_DIR / f"{n}.json").read_text())) == fields, n
        cfg = load_named(n)
        assert cfg.stage == n.removeprefix("toy_") and cfg.model_config() == TOY_MODEL
        assert StageConfig.from_dict(json.loads(cfg.to_json())) == cfg
    old = {**load_named("toy_dmd").to_dict(), "base_checkpoint": "x.safetensors", "extra": {"note": "old run"}}
    assert StageConfig.from_dict(old) == load_named("toy_dmd")  # state.json of older runs still loads
    with pytest.raises(FileNotFoundError, match="shipped: toy_causal, toy_dmd, toy_ode, toy_teacher"):
        load_named("ltx2_19b_stage3_dmd")


def test_report_table_runs_every_path(toy, tmp_path):
    from omniforcing_core.toy.report import format_table, run_report
    ccfg = toy_config("causal", data=str(toy / "ode"), init=str(toy / "teacher"), steps=1, batch=2, **SMALL)
    Runner(ccfg, tmp_path / "causal", log=_quiet).run()
    rows = run_report(toy / "teacher", tmp_path / "causal", toy / "codecs.safetensors", n=1, teacher_steps=2,
                      size=64, log=_quiet, stage2_dir=tmp_path / "causal")
    names = [r["model"] for r in rows]
    assert names[0].startswith("ground-truth") and any(n.startswith("student") for n in names)
    assert any(n.startswith("undistilled causal") for n in names) and any(n.startswith("teacher") for n in names)
    assert rows[0]["event_recall"] == 1.0  # the detectors find the exact events of the world clip
    by = {r["model"].split(",")[0]: r for r in rows}
    for who in ("teacher", "student"):  # V->A rows measure the true video: its events are the ground truth's
        assert by[f"V->A: {who}"]["visual_events"] == rows[0]["visual_events"] and by[f"V->A: {who}"]["presence"] == 1.0
        assert by[f"A->V: {who}"]["s_per_clip"] > 0
    table = format_table(rows)
    assert table.count("\n") == len(rows) + 1 and "time to first chunk" in table


def test_stage_one_bidirectional_dmd_trains_and_initialises_stage_two(toy, tmp_path):
    cfg = toy_config("bidmd", data=str(toy / "data"), init=str(toy / "teacher"), teacher=str(toy / "teacher"),
                     steps=3, batch=2, gen_every=2, ema_start=1, lr=1e-3, **SMALL)
    st1 = BidirectionalDMDStage(cfg)
    g = torch.Generator().manual_seed(0)
    c = st1.model.config.caption_channels
    text = st1.model.text_kv(torch.randn(2, 4, c, generator=g), torch.randn(2, 4, c, generator=g))
    xv, xa, e = st1.rollout(text, torch.Generator().manual_seed(1), 0, grad=True)
    assert xv.shape == (2, *st1.clip.video_shape()[1:]) and xa.shape == (2, *st1.clip.audio_shape()[1:])
    assert xv.requires_grad and 0 <= e < st1.schedule.steps
    r = Runner(cfg, tmp_path / "bidmd", log=_quiet)
    r.run()
    m = json.loads((tmp_path / "bidmd" / "state.json").read_text())["metrics"]
    assert "dmd" in m[0] and all(torch.isfinite(torch.tensor(x["critic"])) for x in m)
    teacher = TeacherStage(toy_config("teacher", data=str(toy / "data"), **SMALL))
    load_checkpoint(toy / "teacher", teacher)
    assert not _states_equal(teacher.model.state_dict(), r.stage.model.state_dict())  # it trained
    ccfg = toy_config("causal", data=str(toy / "ode"), init=str(tmp_path / "bidmd"), steps=1, batch=2, **SMALL)
    st = CausalStage(ccfg)  # Stage II starts from the Stage I generator
    assert _states_equal(st.model.state_dict(), r.stage.model.state_dict())
