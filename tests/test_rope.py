import math

import pytest
import torch

from omniforcing_core.layout import DEFAULT_TIME
from omniforcing_core.rope import (RopeConfig, apply_rope, audio_cross_table, audio_self_table, video_cross_table,
                                   video_self_table)

T = DEFAULT_TIME


def test_physical_positions_match_ltx2_causal_fix():
    assert T.video.latent_time(0) == pytest.approx(0.5 / 24)
    assert [round(T.video.latent_time(f), 4) for f in (1, 2, 3, 15)] == [0.2083, 0.5417, 0.875, 4.875]
    assert T.audio.latent_time(0) == pytest.approx(0.005)
    assert [round(T.audio.latent_time(a), 4) for a in (1, 2, 25, 26, 125)] == [0.03, 0.07, 0.99, 1.03, 4.99]


def _angles_bruteforce(frac_axes, dim, theta=10000.0):
    """Angles per rotated pair, straight from the definition, in float64."""
    n_axes = len(frac_axes)
    n = dim // (2 * n_axes)
    out = []
    for i in range(n):
        w = (math.pi / 2) * theta ** (i / (n - 1))
        for a in range(n_axes):
            out.append(w * (2 * frac_axes[a] - 1))
    return out, dim // 2 - len(out)


@pytest.mark.parametrize("f,h,w", [(0, 0, 0), (3, 1, 2), (7, 3, 0)])
def test_interleaved_video_rope_equals_definition(f, h, w):
    cfg = RopeConfig("interleaved", "float64")
    dim, heads = 48, 2
    tab = video_self_table(range(8), (4, 3), T, dim, heads, cfg)
    tok = f * 12 + h * 3 + w
    frac = (T.video.latent_time(f) / 20, (h * 32 + 16) / 2048, (w * 32 + 16) / 2048)
    ang, pad = _angles_bruteforce(frac, dim)
    x = torch.randn(1, 1, dim, dtype=torch.float64)
    y = apply_rope(x, tab.slice(tok, tok + 1))[0, 0]
    x = x[0, 0]
    want = x.clone()
    for p, a in enumerate(ang):
        i = 2 * (pad + p)
        want[i] = x[i] * math.cos(a) - x[i + 1] * math.sin(a)
        want[i + 1] = x[i + 1] * math.cos(a) + x[i] * math.sin(a)
    assert torch.allclose(y, want, atol=1e-12)


def test_split_rope_rotates_half_against_half_per_head():
    cfg = RopeConfig("split", "float64")
    dim, heads = 64, 2  # 32 frequencies, 1 axis -> per head 16 angles
    tab = audio_self_table(range(5), 0, T, dim, heads, cfg)
    frac = (T.audio.latent_time(4) / 20,)
    ang, pad = _angles_bruteforce(frac, dim)
    assert pad == 0
    x = torch.randn(1, 1, dim, dtype=torch.float64)
    y = apply_rope(x, tab.slice(4, 5))[0, 0]
    x = x[0, 0]
    hd = dim // heads
    for hh in range(heads):
        for j in range(hd // 2):
            a = ang[hh * hd // 2 + j]
            x1, x2 = x[hh * hd + j], x[hh * hd + hd // 2 + j]
            assert y[hh * hd + j] == pytest.approx(float(x1 * math.cos(a) - x2 * math.sin(a)), abs=1e-12)
            assert y[hh * hd + hd // 2 + j] == pytest.approx(float(x2 * math.cos(a) + x1 * math.sin(a)), abs=1e-12)


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
def test_block_slices_equal_full_sequence(kind, precision):
    cfg = RopeConfig(kind, precision)
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


def test_float32_grid_differs_from_float64_only_by_rounding():
    a = video_self_table(range(16), (2, 2), T, 4096, 32, RopeConfig("interleaved", "float32"))
    b = video_self_table(range(16), (2, 2), T, 4096, 32, RopeConfig("interleaved", "float64"))
    d = (a.cos.double() - b.cos).abs().max().item()
    assert 0 < d < 5e-3
