import math

import numpy as np
import pytest
import torch

from omniforcing_core.layout import DEFAULT_TIME
from omniforcing_core.rope import (ARITHMETICS, RopeConfig, apply_rope, audio_cross_table, audio_self_table,
                                   frequencies, latent_seconds, video_cross_table, video_fractions,
                                   video_self_table)

T = DEFAULT_TIME
f32 = np.float32


def test_physical_positions_match_ltx2_causal_fix():
    assert T.video.latent_time(0) == pytest.approx(0.5 / 24)
    assert [round(T.video.latent_time(f), 4) for f in (1, 2, 3, 15)] == [0.2083, 0.5417, 0.875, 4.875]
    assert T.audio.latent_time(0) == pytest.approx(0.005)
    assert [round(T.audio.latent_time(a), 4) for a in (1, 2, 25, 26, 125)] == [0.03, 0.07, 0.99, 1.03, 4.99]


def _angles_bruteforce(frac_axes, dim, theta):
    """Angles per rotated pair, straight from the definition, in float64."""
    n_axes = len(frac_axes)
    n = dim // (2 * n_axes)
    out = []
    for i in range(n):
        w = (math.pi / 2) * theta ** (i / (n - 1))
        for a in range(n_axes):
            out.append(w * (2 * frac_axes[a] - 1))
    return out, dim // 2 - len(out)


# theta 10: the highest frequency is 5*pi, so float32 angles are within ~1e-6 of the float64 definition
# and the test sees the layout (pair order, axis interleaving, padding) rather than float32 rounding
@pytest.mark.parametrize("f,h,w", [(0, 0, 0), (3, 1, 2), (7, 3, 0)])
def test_interleaved_video_rope_equals_definition(f, h, w):
    cfg = RopeConfig("interleaved", "float64", theta=10.0)
    dim, heads = 48, 2
    tab = video_self_table(range(8), (4, 3), T, dim, heads, cfg)
    tok = f * 12 + h * 3 + w
    frac = (T.video.latent_time(f) / 20, (h * 32 + 16) / 2048, (w * 32 + 16) / 2048)
    ang, pad = _angles_bruteforce(frac, dim, 10.0)
    x = torch.randn(1, 1, dim, dtype=torch.float64)
    y = apply_rope(x, tab.slice(tok, tok + 1))[0, 0]
    x = x[0, 0]
    want = x.clone()
    for p, a in enumerate(ang):
        i = 2 * (pad + p)
        want[i] = x[i] * math.cos(a) - x[i + 1] * math.sin(a)
        want[i + 1] = x[i + 1] * math.cos(a) + x[i] * math.sin(a)
    assert torch.allclose(y, want, atol=1e-5)


def test_split_rope_rotates_half_against_half_per_head():
    cfg = RopeConfig("split", "float64", theta=10.0)
    dim, heads = 64, 2  # 32 frequencies, 1 axis -> per head 16 angles
    tab = audio_self_table(range(5), 0, T, dim, heads, cfg)
    frac = (T.audio.latent_time(4) / 20,)
    ang, pad = _angles_bruteforce(frac, dim, 10.0)
    assert pad == 0
    x = torch.randn(1, 1, dim, dtype=torch.float64)
    y = apply_rope(x, tab.slice(4, 5))[0, 0]
    x = x[0, 0]
    hd = dim // heads
    for hh in range(heads):
        for j in range(hd // 2):
            a = ang[hh * hd // 2 + j]
            x1, x2 = x[hh * hd + j], x[hh * hd + hd // 2 + j]
            assert y[hh * hd + j] == pytest.approx(float(x1 * math.cos(a) - x2 * math.sin(a)), abs=1e-5)
            assert y[hh * hd + hd // 2 + j] == pytest.approx(float(x2 * math.cos(a) + x1 * math.sin(a)), abs=1e-5)


def test_split_video_has_padding_first_and_it_is_identity():
    cfg = RopeConfig("split", "float64")
    tab = video_self_table(range(2), (2, 2), T, 4096, 32, cfg)
    assert tab.cos.shape == (8, 32, 64)
    assert torch.all(tab.cos[:, 0, :2] == 1) and torch.all(tab.sin[:, 0, :2] == 0)  # 2 padding frequencies
    assert not torch.all(tab.sin[:, 0, 2:] == 0)
    tab = video_self_table(range(2), (2, 2), T, 4096, 32, RopeConfig("interleaved"))
    assert torch.all(tab.cos[:, :4] == 1) and torch.all(tab.sin[:, :4] == 0)  # 4 padding dims


@pytest.mark.parametrize("kind", ["interleaved", "split"])
@pytest.mark.parametrize("precision", ["float32", "float64"])
@pytest.mark.parametrize("arithmetic,causal_fix,positions", [("omniforcing", True, "middle"),
                                                             ("ltx-core", True, "middle"),
                                                             ("comfyui", False, "start")])
def test_block_slices_equal_full_sequence(kind, precision, arithmetic, causal_fix, positions):
    """The KV path's per-block tables (absolute positions) are bit-identical slices of the full tables."""
    cfg = RopeConfig(kind, precision, arithmetic=arithmetic, causal_fix=causal_fix, positions=positions)
    grid = (2, 3)
    full_v = video_self_table(range(16), grid, T, 96, 2, cfg)
    full_vc = video_cross_table(range(16), 6, T, 32, 2, cfg)
    full_a = audio_self_table(range(126), 0, T, 32, 2, cfg)
    full_ac = audio_cross_table(range(126), 0, T, 32, 2, cfg)
    for vs, ve, as_, ae in ((0, 4, 0, 26), (4, 7, 26, 51), (13, 16, 101, 126)):
        assert torch.equal(video_self_table(range(vs, ve), grid, T, 96, 2, cfg).cos, full_v.slice(vs * 6, ve * 6).cos)
        assert torch.equal(video_cross_table(range(vs, ve), 6, T, 32, 2, cfg).sin, full_vc.slice(vs * 6, ve * 6).sin)
        assert torch.equal(audio_self_table(range(as_, ae), 0, T, 32, 2, cfg).sin, full_a.slice(as_, ae).sin)
        assert torch.equal(audio_cross_table(range(as_, ae), 0, T, 32, 2, cfg).cos, full_ac.slice(as_, ae).cos)


def test_sinks_get_identity_rotation():
    cfg = RopeConfig("interleaved")
    tab = audio_self_table(range(3), 4, T, 32, 2, cfg)
    x = torch.randn(1, 7, 32)
    y = apply_rope(x, tab)
    assert torch.equal(y[:, :4], x[:, :4])
    assert not torch.allclose(y[:, 4:], x[:, 4:])


# -- the float32 recipes of the references, restated with numpy float32 arithmetic ---------------------------

@pytest.mark.parametrize("n", [1, 2, 5, 341, 682, 1024])
def test_frequency_grids(n):
    """float32: theta ** linspace(0, 1, n) * pi / 2 in float32 (ltx-causal; ltx-core/ComfyUI "float32");
    float64: numpy float64 rounded once to float32 (ltx-core/ComfyUI "float64"). Both within float32
    rounding of the exact (pi/2) * theta^(i/(n-1)); the float64 grid is that value correctly rounded."""
    dim = 2 * n
    exact = (math.pi / 2) * np.power(10000.0, np.linspace(0.0, 1.0, n))
    g32 = frequencies(1, dim, RopeConfig(precision="float32")).numpy()
    g64 = frequencies(1, dim, RopeConfig(precision="float64")).numpy()
    assert g32.dtype == g64.dtype == np.float32 and g32.shape == g64.shape == (n,)
    assert np.array_equal(g64, exact.astype(np.float32))
    assert np.all(np.abs(g32 - exact) <= 4e-6 * exact)  # a few float32 ulp: theta ** x amplifies x's rounding
    lin = torch.linspace(0, 1, n, dtype=torch.float32)
    assert np.array_equal(g32, ((10000.0 ** lin) * math.pi / 2).numpy())


def _reference_seconds(arithmetic, s, e, rate, video, where):
    """Seconds per latent as each reference rounds them (numpy float32 restatement)."""
    s, e, rate = s.astype(f32), e.astype(f32), f32(rate)
    recip = video and arithmetic == "comfyui"
    sec = (lambda x: x * f32(1.0 / float(rate))) if recip else (lambda x: x / rate)
    if where == "start":
        return sec(s)
    if arithmetic == "omniforcing":
        return sec((s + e) / f32(2))
    return (sec(s) + sec(e)) / f32(2)


@pytest.mark.parametrize("arithmetic", ARITHMETICS)
@pytest.mark.parametrize("causal_fix", [True, False])
@pytest.mark.parametrize("where", ["middle", "start"])
def test_latent_seconds_round_in_each_references_order(arithmetic, causal_fix, where):
    cfg = RopeConfig(arithmetic=arithmetic, causal_fix=causal_fix, positions=where)
    lat = np.arange(0, 400)
    for codec, video in ((T.video, True), (T.audio, False)):
        st = codec.stride
        causal = causal_fix if video else True  # audio latents are causal in every reference
        s = np.maximum(0, lat * st - st + 1) if causal else lat * st
        e = np.maximum(0, lat * st + 1) if causal else (lat + 1) * st
        got = latent_seconds(codec, range(0, 400), cfg, video=video, where=where).numpy()
        want = _reference_seconds(arithmetic, s, e, codec.frame_rate, video, where)
        assert got.dtype == np.float32 and np.array_equal(got, want), (codec, arithmetic)
    if where == "middle" and causal_fix:  # and all of them are within rounding of the exact times
        exact = np.array([T.video.latent_time(f) for f in lat])
        got = latent_seconds(T.video, range(0, 400), cfg, video=True, where="middle").numpy()
        assert np.allclose(got, exact, rtol=2e-7, atol=0)


def test_the_three_arithmetics_differ_in_the_last_bit():
    """Not a distinction without a difference: over 400 latents the references round video times apart."""
    secs = {a: latent_seconds(T.video, range(400), RopeConfig(arithmetic=a), video=True, where="middle")
            for a in ARITHMETICS}
    assert not torch.equal(secs["omniforcing"], secs["ltx-core"])
    assert not torch.equal(secs["ltx-core"], secs["comfyui"])


def test_comfyui_default_positions_are_the_start_of_non_causal_bounds():
    cfg = RopeConfig(arithmetic="comfyui", causal_fix=False, positions="start")
    fr = video_fractions(range(3), (2, 2), T, cfg)
    t = fr.view(3, 2, 2, 3)[:, 0, 0, 0] * 20
    assert torch.allclose(t, torch.tensor([0.0, 8 / 24, 16 / 24]), atol=1e-6)
    assert torch.equal(fr.view(3, 2, 2, 3)[0, :, 0, 1] * 2048, torch.tensor([0.0, 32.0]))  # pixel starts


def test_angles_and_tables_are_float32_values_whatever_the_storage():
    a = video_self_table(range(16), (2, 2), T, 4096, 32, RopeConfig("interleaved", "float32"))
    b = video_self_table(range(16), (2, 2), T, 4096, 32, RopeConfig("interleaved", "float64"))
    assert a.cos.dtype == torch.float32 and b.cos.dtype == torch.float64
    assert torch.equal(b.cos.float().double(), b.cos)  # float64 storage of float32 values
    d = (a.cos.double() - b.cos).abs().max().item()
    assert 0 < d < 5e-3  # the grids differ by float32 rounding, amplified at the highest frequencies
