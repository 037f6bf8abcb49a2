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

The CPU matters for the first two. Every reference (and we, op for op) computes the timestep embedding and the
RoPE cos/sin with torch's float32 exp/sin/cos, which torch runs through MKL's VML, and MKL picks their code by
CPU: AVX-512 code on an Intel CPU with AVX-512, AVX2 code on an older Intel CPU, generic code on any other
x86-64 CPU (AMD included; ATEN_CPU_CAPABILITY and NPY_* do not change it). These round a few near-halfway
values to different neighbours, 1 ulp apart (19B tables: a few angles, up to 640 of 12.6M values; the student:
up to 1.1e-6 relative in its output), so a reference's output is only reproducible on a CPU that takes the same
code path; likewise ATen's scalar `theta ** linspace` (the float32 frequency grid) on a CPU without AVX2. Those
fixtures were therefore written once per code path (`*.vml-<path>.safetensors`, make_fixtures.VML_PATHS), each
with `vml_probe()` of the process that wrote it, and the tests hold us to the file whose probe equals their own
process's: the reference as run on a CPU like this one. A process whose probe matches none (another torch or
MKL build) gets the bounds those 1-ulp differences justify, with a warning: RoPE values within 1 ulp of the
recorded paths' (those with this process's pow, if any) on a sample of about 1024 values per table, the student
within FALLBACK_FACTOR x the largest difference between the recorded paths' outputs.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Optional

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


@functools.lru_cache(maxsize=None)
def _probe() -> dict:
    """make_fixtures.vml_probe() in this process: which code path its float32 exp/sin/cos/pow take."""
    spec = importlib.util.spec_from_file_location("_omniforcing_make_fixtures", FIX / "make_fixtures.py")
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    return mf.vml_probe()


def _variants(stem: str) -> dict:
    """{code path: (tensors, meta)} of a fixture written once per CPU code path (make_fixtures.VML_PATHS)."""
    out = {}
    for path in sorted(FIX.glob(f"{stem}.vml-*.safetensors")):
        tensors, meta = _fixture(path.name)
        out[meta["vml_path"]] = (tensors, meta)
    assert out, f"no {stem}.vml-*.safetensors in {FIX}"
    return out


def _here(variants: dict) -> Optional[str]:
    """The recorded code path that this process takes (its probe is the file's), or None."""
    here = [b for b, (_, meta) in variants.items() if meta["vml_probe"] == _probe()]
    assert len(here) <= 1, f"recorded code paths with one probe: {here}"
    return here[0] if here else None


def _unrecorded(what: str) -> None:
    warnings.warn(f"{what}: this process's float32 exp/sin/cos/pow (probe {_probe()}) match none of the CPU code "
                  "paths the fixtures were written on, so only the bound their 1-ulp differences justify is "
                  "checked (module doc)")


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

FALLBACK_FACTOR = 10.0  # the student's bound on an unrecorded code path: 10x the recorded paths' spread


@pytest.fixture(scope="module")
def official():
    """Weights and inputs, the config, and the reference's outputs as computed on each recorded code path."""
    fx, meta = _fixture("official_causal.safetensors")
    c = meta["config"]
    cfg = ModelConfig(num_layers=c["num_layers"], video_heads=c["video_heads"], video_head_dim=c["video_head_dim"],
                      audio_heads=c["audio_heads"], audio_head_dim=c["audio_head_dim"],
                      caption_channels=c["caption_channels"], in_channels=c["in_channels"],
                      audio_in_channels=c["audio_in_channels"]).with_conventions("omniforcing-student")
    return fx, meta, cfg, _variants("official_causal")


def _student_target(variants: dict) -> tuple[list, float]:
    """The reference outputs to compare with and the bound: the run on this process's code path to 1e-12, else
    every recorded run to FALLBACK_FACTOR x the largest difference between two of them (1-ulp differences in
    the float32 timestep embedding and RoPE tables, carried through the model)."""
    here = _here(variants)
    if here:
        return [variants[here][0]], 1e-12
    outs = [t for t, _ in variants.values()]
    return outs, FALLBACK_FACTOR * max(rel(a[k], b[k]) for a in outs for b in outs for k in a)


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


def _student_diffs(model, fx, grid, outs: list) -> dict:
    """Per block, the largest relative difference from any of `outs` (reference outputs)."""
    d = {}
    for b, mv, ma, kv, ka in _student_paths(model, fx, grid):
        vs, as_ = slice(b.video_start, b.video_end), slice(b.audio_start, b.audio_end)
        d[b.index] = {"masked video": max(rel(mv, o["out.masked.video"][:, :, vs]) for o in outs),
                      "masked audio": max(rel(ma, o["out.masked.audio"][:, :, as_]) for o in outs),
                      "kv video": max(rel(kv, o["out.kv.video"][:, :, vs]) for o in outs),
                      "kv audio": max(rel(ka, o["out.kv.audio"][:, :, as_]) for o in outs)}
    return d


def test_student_preset_equals_ltx_causal_per_block_masked_and_kv_float64(official):
    """<= 1e-12 relative against ltx-causal run on this CPU's code path (module doc); on an unrecorded
    path, within FALLBACK_FACTOR x the recorded paths' spread of each of them, with a warning."""
    fx, meta, cfg, variants = official
    targets, bound = _student_target(variants)
    if len(targets) > 1:
        _unrecorded(f"student vs ltx-causal: checked to {bound:.1e}, not 1e-12")
    d = _student_diffs(_model(cfg, fx, torch.float64), fx, tuple(meta["config"]["grid"]), targets)
    for k, row in d.items():
        print(f"ltx-causal block {k}: " + ", ".join(f"{n} {v:.1e}" for n, v in row.items()))
    assert len(d) == 3 and max(max(r.values()) for r in d.values()) <= bound, (bound, d)


def test_negative_control_student_one_position_shift_and_swapped_arithmetic(official):
    """Discriminating fixture: a video one latent late, or another reference's float32 op order for the
    same positions, fails the 1e-12 target by orders of magnitude (and the bound of an unrecorded code path)."""
    fx, meta, cfg, variants = official
    grid = tuple(meta["config"]["grid"])
    targets, bound = _student_target(variants)
    shifted = _model(cfg, fx, torch.float64)
    orig = shifted.ropes_for
    shifted.ropes_for = lambda v, a, g, s: orig(range(v.start + 1, v.stop + 1), a, g, s)
    d_shift = _student_diffs(shifted, fx, grid, targets)
    swapped = _model(cfg.with_conventions(cfg.conventions.replace(rope_arithmetic="ltx-core")), fx, torch.float64)
    d_swap = _student_diffs(swapped, fx, grid, targets)
    worst_shift = min(max(r.values()) for r in d_shift.values())
    worst_swap = max(max(r.values()) for r in d_swap.values())
    print(f"negative controls: video one latent late: every block >= {worst_shift:.1e}; "
          f"ltx-core arithmetic: worst {worst_swap:.1e} (bound {bound:.1e})")
    assert worst_shift > 1e-3 and worst_swap > max(1e-8, bound)


def test_student_masked_path_equals_its_kv_path_float64(official):
    fx, meta, cfg, _ = official
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


def _ulps(ours: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|ours - want| in float32 ulps of want."""
    want = want.float()
    spacing = torch.nextafter(want.abs(), torch.tensor(float("inf"))) - want.abs()
    return (ours.double() - want.double()).abs() / spacing.double()


def _rope_mismatches(ref: str, spans, cfg: RopeConfig) -> tuple[Optional[str], list, list]:
    """Our tables against the reference's: (this process's recorded code path or None; tables whose SHA-256
    differs from the reference's on that path; tables whose sampled values are more than 1 ulp from the
    reference's on a recorded path with our pow, with the largest distance in ulps)."""
    variants = _variants(f"rope19b_{ref}")
    here = _here(variants)
    sizes = next(iter(variants.values()))[1]["sizes"]
    # values to within 1 ulp: the paths with our float32 pow (our frequency grid) if any are recorded, else all
    near = {b: v for b, v in variants.items() if v[1]["vml_probe"]["pow"] == _probe()["pow"]} or variants
    hash_bad, sample_bad = [], []
    for span_name, vs, ve, as_, ae in spans:
        for kind, tab in _tables(cfg, sizes, vs, ve, as_, ae):
            name = f"{ref}.{span_name}.{kind}"
            for part in ("cos", "sin"):
                flat = _canonical(tab, part).flatten()
                worst = 0.0
                for path, (fx, meta) in variants.items():
                    want = meta["hashes"][name]
                    assert [tab.length, flat.numel() // tab.length] == want["shape"], name
                    if path in near:
                        worst = max(worst, _ulps(flat[::want["sample_stride"]], fx[f"{name}.{part}"]).max().item())
                    if path == here and _sha(tab, part) != want[part]:
                        hash_bad.append((name, part))
                if worst > 1:
                    sample_bad.append((name, part, worst))
            del tab
    return here, hash_bad, sample_bad


@pytest.mark.parametrize("ref,case", list(_rope_configs()))
def test_rope_tables_are_bit_identical_to_the_reference_at_19b_sizes(ref, case):
    """Bit-identical (SHA-256 of the whole float32 table) to the reference run on this CPU's code path (module
    doc), and within 1 ulp of the recorded paths with its pow on each table's sample; on an unrecorded path,
    the latter only, with a warning."""
    meta = next(iter(_variants(f"rope19b_{ref}").values()))[1]
    s = meta["sizes"]
    spans = [(case, 0, s["frames"], 0, s["audio"])]
    if ref == "official":  # the KV path's per-block tables (start_frame offsets), too
        spans += [(f"block{k}", *b) for k, b in enumerate(s["blocks"])]
    here, hash_bad, sample_bad = _rope_mismatches(ref, spans, _rope_configs()[(ref, case)])
    assert not sample_bad, f"values more than 1 ulp from {ref} ({case}): {sample_bad}"
    if here is None:
        _unrecorded(f"RoPE {ref} ({case}): sampled values checked to 1 ulp, tables not hashed")
    assert not hash_bad, f"tables differing from {ref} ({case}) run on code path {here}: {hash_bad}"


def test_negative_control_rope_another_arithmetic_or_grid_is_not_bit_identical():
    """Another reference's op order, or the float64 grid, misses the official hashes and is more than 1 ulp off
    on the sample (so it fails on any code path); the size of the miss is measured against our (bit-identical)
    student tables of the same block."""
    sizes = next(iter(_variants("rope19b_official").values()))[1]["sizes"]
    block0 = [("block0", *sizes["blocks"][0])]
    right = {k: t for k, t in _tables(RopeConfig(), sizes, *sizes["blocks"][0])}
    for wrong in (RopeConfig(arithmetic="comfyui"), RopeConfig(precision="float64")):
        here, hash_bad, sample_bad = _rope_mismatches("official", block0, wrong)
        report = []
        for kind, tab in _tables(wrong, sizes, *sizes["blocks"][0]):
            d = (tab.cos.double() - right[kind].cos.double()).abs()
            report.append(f"{kind} max {d.max().item():.1e} on {(d > 0).double().mean().item():.1%}")
        print(f"rope negative control {wrong.arithmetic}/{wrong.precision}: {len(hash_bad)} of 8 hashes differ "
              f"(path {here}), {len(sample_bad)} of 8 samples > 1 ulp off; " + ", ".join(report))
        assert sample_bad and (here is None or hash_bad)


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
