"""Exactness against the reference implementations, on outputs the reference code itself computed.

The fixtures in tests/reference/ were written by tests/reference/make_fixtures.py, which ran
  * OmniForcing's `ltx-causal` CausalLTXModel (the released student's code) in float64,
  * ComfyUI 783545f6's LTXAVModel in float32 (its defaults, and the LTX-2 header's values),
  * Lightricks ltx-core's LTXModel + Embeddings1DConnector in float32 (the LTX-2 header),
  * each reference's own RoPE functions at the real 19B sizes,
on random weights whose q/k-norm weights are scaled so attention is sharp (a wrong position moves the
output by far more than rounding). No reference code is needed to run these tests.

Targets: the `omniforcing-student` preset equals ltx-causal per block, masked and KV paths, to <= 1e-12
relative in float64; RoPE tables are bit-identical in float32 for every reference; the `comfyui` and
`ltx-core` presets equal those references' bidirectional forward (raw text through the connectors)
within float32 rounding (<= 1e-6 relative), with scalar and per-token sigmas. Each has a negative control:
a one-latent position shift or one swapped convention fails by orders of magnitude.
Run with -s to see the measured differences.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from omniforcing_core.config import ConnectorConfig, ModelConfig, get_preset
from omniforcing_core.layout import DEFAULT_TIME, make_layout
from omniforcing_core.model import OmniForcingTransformer
from omniforcing_core.rope import (RopeConfig, audio_cross_table, audio_self_table, video_cross_table,
                                   video_self_table)

FIX = Path(__file__).resolve().parent / "reference"
# the LTX-2 19B header's convention values (what ComfyUI / ltx-core take from it)
HEADER = dict(rope_kind="split", rope_precision="float64", av_ca_timestep_scale_multiplier=1000.0, causal_fix=True,
              positions="middle")


def _fixture(name: str):
    path = FIX / name
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["fixture"])
    return load_file(str(path)), meta


def rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|."""
    ref = ref.double()
    return ((ours.double() - ref).abs().max() / ref.abs().max()).item()


def rel_norm(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| (Frobenius)."""
    ref = ref.double()
    return ((ours.double() - ref).norm() / ref.norm()).item()


def _model(cfg: ModelConfig, weights: dict, dtype) -> OmniForcingTransformer:
    m = OmniForcingTransformer(cfg, dtype=dtype)
    m.load_state_dict({k[2:]: v.to(dtype) for k, v in weights.items() if k.startswith("w.")})
    return m.eval().requires_grad_(False)


# -- the released student vs ltx-causal (float64) ----------------------------------------------------------

@pytest.fixture(scope="module")
def official():
    fx, meta = _fixture("official_causal.safetensors")
    c = meta["config"]
    cfg = ModelConfig(num_layers=c["num_layers"], video_heads=c["video_heads"], video_head_dim=c["video_head_dim"],
                      audio_heads=c["audio_heads"], audio_head_dim=c["audio_head_dim"],
                      caption_channels=c["caption_channels"], in_channels=c["in_channels"],
                      audio_in_channels=c["audio_in_channels"]).with_conventions("omniforcing-student")
    return fx, meta, cfg


def _student_paths(model, fx, grid):
    """Per block: (masked video, masked audio, kv video, kv audio) outputs of that block, as the fixture
    script ran the reference (history clean at sigma 0, the block noisy, later blocks noisy)."""
    lay = make_layout("v2")
    text = model.text_kv(fx["in.video_context"], fx["in.audio_context"])
    later = float(fx["in.later_sigma"][0])
    fv, fa = fx["in.video_clean"].shape[2], fx["in.audio_clean"].shape[2]
    cache = model.new_cache(lay, grid)
    out = []
    for k in range(len(fx["in.block_sigmas"])):
        b, sk = lay.block(k), float(fx["in.block_sigmas"][k])
        v, a = fx["in.video_clean"].clone(), fx["in.audio_clean"].clone()
        v[:, :, b.video_start:], a[:, :, b.audio_start:] = (fx["in.video_noisy"][:, :, b.video_start:],
                                                            fx["in.audio_noisy"][:, :, b.audio_start:])
        sv, sa = torch.zeros(1, fv), torch.zeros(1, fa)
        sv[:, b.video_start:b.video_end], sv[:, b.video_end:] = sk, later
        sa[:, b.audio_start:b.audio_end], sa[:, b.audio_end:] = sk, later
        mv, ma = model(v, a, sv, sa, text, lay)
        ropes = model.prepare_block(cache, b, grid)
        vs, as_ = slice(b.video_start, b.video_end), slice(b.audio_start, b.audio_end)
        kv, ka = model.forward_block(fx["in.video_noisy"][:, :, vs], fx["in.audio_noisy"][:, :, as_], sk, sk, text,
                                     cache, ropes)
        model.forward_block(fx["in.video_clean"][:, :, vs], fx["in.audio_clean"][:, :, as_], 0.0, 0.0, text, cache,
                            ropes)  # cache refresh, as the reference does
        out.append((b, mv[:, :, vs], ma[:, :, as_], kv, ka))
    return out


def _student_diffs(model, fx, grid) -> dict:
    d = {}
    for b, mv, ma, kv, ka in _student_paths(model, fx, grid):
        vs, as_ = slice(b.video_start, b.video_end), slice(b.audio_start, b.audio_end)
        d[b.index] = {"masked video": rel(mv, fx["out.masked.video"][:, :, vs]),
                      "masked audio": rel(ma, fx["out.masked.audio"][:, :, as_]),
                      "kv video": rel(kv, fx["out.kv.video"][:, :, vs]),
                      "kv audio": rel(ka, fx["out.kv.audio"][:, :, as_])}
    return d


def test_student_preset_equals_ltx_causal_per_block_masked_and_kv_float64(official):
    fx, meta, cfg = official
    d = _student_diffs(_model(cfg, fx, torch.float64), fx, tuple(meta["config"]["grid"]))
    for k, row in d.items():
        print(f"ltx-causal block {k}: " + ", ".join(f"{n} {v:.1e}" for n, v in row.items()))
    assert len(d) == 3 and max(max(r.values()) for r in d.values()) <= 1e-12, d


def test_negative_control_student_one_position_shift_and_swapped_arithmetic(official):
    """Discriminating fixture: a video one latent late, or another reference's float32 op order for the
    same positions, fails the 1e-12 target by orders of magnitude."""
    fx, meta, cfg = official
    grid = tuple(meta["config"]["grid"])
    shifted = _model(cfg, fx, torch.float64)
    orig = shifted.ropes_for
    shifted.ropes_for = lambda v, a, g, s: orig(range(v.start + 1, v.stop + 1), a, g, s)
    d_shift = _student_diffs(shifted, fx, grid)
    swapped = _model(cfg.with_conventions(cfg.conventions.replace(rope_arithmetic="ltx-core")), fx, torch.float64)
    d_swap = _student_diffs(swapped, fx, grid)
    worst_shift = min(max(r.values()) for r in d_shift.values())
    worst_swap = max(max(r.values()) for r in d_swap.values())
    print(f"negative controls: video one latent late: every block >= {worst_shift:.1e}; "
          f"ltx-core arithmetic: worst {worst_swap:.1e}")
    assert worst_shift > 1e-3 and worst_swap > 1e-8


def test_student_masked_path_equals_its_kv_path_float64(official):
    fx, meta, cfg = official
    for b, mv, ma, kv, ka in _student_paths(_model(cfg, fx, torch.float64), fx, tuple(meta["config"]["grid"])):
        assert rel(kv, mv) < 1e-13 and rel(ka, ma) < 1e-13


# -- RoPE tables at the 19B sizes: bit-identical to each reference ------------------------------------

def _rope_configs() -> dict:
    cf = get_preset("comfyui")
    return {
        ("official", "full"): RopeConfig(),
        ("comfyui", "default"): RopeConfig(cf.rope_kind, cf.rope_precision, arithmetic=cf.rope_arithmetic,
                                          causal_fix=cf.causal_fix, positions=cf.positions),
        ("comfyui", "header"): RopeConfig(HEADER["rope_kind"], HEADER["rope_precision"], arithmetic="comfyui",
                                         causal_fix=HEADER["causal_fix"], positions=HEADER["positions"]),
        ("ltx_core", "header"): RopeConfig(HEADER["rope_kind"], HEADER["rope_precision"], arithmetic="ltx-core",
                                          causal_fix=HEADER["causal_fix"], positions=HEADER["positions"]),
    }


def _canonical(tab, part: str, rows: slice = slice(None)) -> torch.Tensor:
    """Rows of the [T, D/2] float32 cos or sin, one value per rotated pair (the fixture's form)."""
    t = getattr(tab, part)[rows]
    t = t[:, ::2] if tab.kind == "interleaved" else t.reshape(t.shape[0], -1)
    return t.float().contiguous()


def _sha(tab, part: str, chunk: int = 512) -> str:
    """SHA-256 of the canonical form, fed a few rows at a time (the 19B video table is 6144 x 4096)."""
    h = hashlib.sha256()
    for i in range(0, tab.length, chunk):
        h.update(_canonical(tab, part, slice(i, i + chunk)).numpy().tobytes())
    return h.hexdigest()


def _tables(cfg: RopeConfig, sizes: dict, vs: int, ve: int, as_: int, ae: int):
    """One table at a time (the 19B video table is 6144 x 4096)."""
    grid, heads = tuple(sizes["grid"]), sizes["heads"]
    yield "video_self", video_self_table(range(vs, ve), grid, DEFAULT_TIME, sizes["video_dim"], heads, cfg)
    yield "audio_self", audio_self_table(range(as_, ae), 0, DEFAULT_TIME, sizes["audio_dim"], heads, cfg)
    yield "video_cross", video_cross_table(range(vs, ve), grid[0] * grid[1], DEFAULT_TIME, sizes["cross_dim"],
                                           heads, cfg)
    yield "audio_cross", audio_cross_table(range(as_, ae), 0, DEFAULT_TIME, sizes["cross_dim"], heads, cfg)


def _rope_mismatches(ref: str, case: str, cfg: RopeConfig, spans) -> list:
    fx, meta = _fixture(f"rope19b_{ref}.safetensors")
    sizes, stride = meta["sizes"], meta["sample_stride"]
    bad = []
    for span_name, vs, ve, as_, ae in spans:
        for kind, tab in _tables(cfg, sizes, vs, ve, as_, ae):
            name = f"{ref}.{span_name}.{kind}"
            want = meta["hashes"][name]
            assert [tab.length, tab.cos[0].numel() // (2 if tab.kind == "interleaved" else 1)] == want["shape"], name
            for part in ("cos", "sin"):
                if _sha(tab, part) != want[part]:
                    sample = fx.get(f"{name}.{part}")  # a strided sample of the full tables, for the size
                    diff = float("nan") if sample is None else \
                        (_canonical(tab, part).flatten()[::stride] - sample).abs().max().item()
                    bad.append((name, part, diff))
            del tab
    return bad


@pytest.mark.parametrize("ref,case", list(_rope_configs()))
def test_rope_tables_are_bit_identical_to_the_reference_at_19b_sizes(ref, case):
    _, meta = _fixture(f"rope19b_{ref}.safetensors")
    s = meta["sizes"]
    spans = [(case, 0, s["frames"], 0, s["audio"])]
    if ref == "official":  # the KV path's per-block tables (start_frame offsets), too
        spans += [(f"block{k}", *b) for k, b in enumerate(s["blocks"])]
    bad = _rope_mismatches(ref, case, _rope_configs()[(ref, case)], spans)
    assert not bad, f"tables differing from {ref} ({case}): {bad}"


def test_negative_control_rope_another_arithmetic_or_grid_is_not_bit_identical():
    """Another reference's op order, or the float64 grid, misses the official hashes; the size of the miss
    is measured against our (bit-identical) student tables of the same block."""
    sizes = _fixture("rope19b_official.safetensors")[1]["sizes"]
    block0 = [("block0", *sizes["blocks"][0])]
    right = {k: t for k, t in _tables(RopeConfig(), sizes, *sizes["blocks"][0])}
    for wrong in (RopeConfig(arithmetic="comfyui"), RopeConfig(precision="float64")):
        bad = _rope_mismatches("official", "block0", wrong, block0)
        report = []
        for kind, tab in _tables(wrong, sizes, *sizes["blocks"][0]):
            d = (tab.cos.double() - right[kind].cos.double()).abs()
            report.append(f"{kind} max {d.max().item():.1e} on {(d > 0).double().mean().item():.1%}")
        print(f"rope negative control {wrong.arithmetic}/{wrong.precision}: {len(bad)} of 8 hashes differ; "
              + ", ".join(report))
        assert bad


# -- bidirectional: the comfyui and ltx-core presets vs their references (float32) ---------------------------

@pytest.fixture(scope="module")
def bidirectional():
    fx, meta = _fixture("bidirectional_weights.safetensors")
    c = meta["config"]
    conn = ConnectorConfig(num_layers=c["connector_layers"], heads=c["connector_heads"],
                           head_dim=c["connector_head_dim"], num_registers=c["connector_registers"])
    cfg = ModelConfig(num_layers=c["num_layers"], video_heads=c["video_heads"], video_head_dim=c["video_head_dim"],
                      audio_heads=c["audio_heads"], audio_head_dim=c["audio_head_dim"],
                      caption_channels=c["caption_channels"], in_channels=c["in_channels"],
                      audio_in_channels=c["audio_in_channels"], connectors=conn)
    return fx, cfg


def _bidirectional(model, fx, case: str):
    vctx, actx = model.encode_text(fx["in.text"])  # raw text through our connectors
    text = model.text_kv(vctx, actx)
    if case == "scalar":
        return model(fx["in.video"], fx["in.audio"], fx["in.sigma"], fx["in.sigma"], text)
    return model(fx["in.video"], fx["in.audio"], fx["in.video_sigma_frames"], fx["in.audio_sigma_frames"], text)


BIDIRECTIONAL = [("comfyui", "default", "comfyui", {}), ("comfyui", "header", "comfyui", HEADER),
                 ("ltx_core", None, "ltx-core", {})]


@pytest.mark.parametrize("ref,variant,preset,header", BIDIRECTIONAL)
@pytest.mark.parametrize("case", ["scalar", "token"])
def test_preset_equals_the_reference_bidirectional_forward_float32(bidirectional, ref, variant, preset, header, case):
    fx, cfg = bidirectional
    out, meta = _fixture(f"{ref}.safetensors")
    model = _model(cfg.with_conventions(get_preset(preset).replace(**header)), fx, torch.float32)
    v, a = _bidirectional(model, fx, case)
    key = f"out.{variant}.{case}" if variant else f"out.{case}"
    d = {"video": (rel(v, out[f"{key}.video"]), rel_norm(v, out[f"{key}.video"])),
         "audio": (rel(a, out[f"{key}.audio"]), rel_norm(a, out[f"{key}.audio"]))}
    print(f"{preset} vs {meta['reference'].split(' ')[0]} {variant or ''} {case}: "
          + ", ".join(f"{m} max {x:.1e} / norm {y:.1e}" for m, (x, y) in d.items()))
    assert max(y for _, y in d.values()) <= 1e-6 and max(x for x, _ in d.values()) <= 2e-6, d


@pytest.mark.parametrize("swap", [dict(gate_timestep="own"), dict(v2a_norm="before-a2v"), dict(qk_norm_eps=1e-6),
                                  dict(positions="middle")])
def test_negative_control_comfyui_one_swapped_convention_fails_by_orders_of_magnitude(bidirectional, swap):
    fx, cfg = bidirectional
    out, _ = _fixture("comfyui.safetensors")
    model = _model(cfg.with_conventions(get_preset("comfyui").replace(**swap)), fx, torch.float32)
    d = max(rel_norm(t, out[f"out.default.token.{m}"]) for m, t in zip(("video", "audio"),
                                                                         _bidirectional(model, fx, "token")))
    print(f"comfyui with {swap}: {d:.1e}")
    assert d > 1e-5


def test_negative_control_ltx_core_other_gate_rule_fails(bidirectional):
    """Per-token sigmas that differ across the batch tell ltx-core's per-sample rule from ComfyUI's batch max."""
    fx, cfg = bidirectional
    out, _ = _fixture("ltx_core.safetensors")
    model = _model(cfg.with_conventions(get_preset("ltx-core").replace(gate_timestep="other-max")), fx, torch.float32)
    d = max(rel_norm(t, out[f"out.token.{m}"]) for m, t in zip(("video", "audio"), _bidirectional(model, fx, "token")))
    print(f"ltx-core with the batch-max gate rule: {d:.1e}")
    assert d > 1e-5
