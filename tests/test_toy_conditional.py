"""Issue 12: conditional training of the toy teacher (independent per-modality sigmas, one modality given
clean) and modality guidance when it samples - checked against direct computations."""
import pytest
import torch
import torch.nn.functional as F

from omniforcing_core.config import TINY
from omniforcing_core.model import OmniForcingTransformer
from omniforcing_core.toy.configs import toy_config
from omniforcing_core.toy.stages import _masked_mse, guided_x0, modality_sigmas, sample_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")


def test_modality_sigmas_split_the_batch_as_configured():
    cfg = toy_config("teacher", independent_sigmas=0.25, given_share=0.25)
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(4000, g, cfg.sigma_shift)
    sv, sa = modality_sigmas(s, g, cfg)
    given_v, given_a = (sv == 0), (sa == 0)
    assert not (given_v & given_a).any()  # never both clean: there is always something to learn
    shared = (sv == sa)
    assert abs(float(given_v.float().mean()) - 0.125) < 0.02 and abs(float(given_a.float().mean()) - 0.125) < 0.02
    assert abs(float(shared.float().mean()) - 0.5) < 0.03
    # where a modality is not given, one of the two still carries the shared draw
    keep = ~(given_v | given_a)
    assert bool(((sv == s) | (sa == s))[keep].all())
    # independent draws reach no-information (sigma near 1) often: what modality guidance asks for
    indep = keep & ~shared
    assert float((torch.maximum(sv, sa)[indep] > 0.9).float().mean()) > 0.1


def test_defaults_keep_the_shared_sigma_draw_unchanged():
    """A config without conditional shares draws nothing extra: older runs resume bit-exactly."""
    cfg = toy_config("teacher", independent_sigmas=0.0, given_share=0.0)
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(8, g, cfg.sigma_shift)
    sv, sa = modality_sigmas(s, g, cfg)
    assert torch.equal(sv, s) and torch.equal(sa, s)


def test_masked_mse_ignores_the_given_samples_only():
    torch.manual_seed(0)
    p, t = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    everyone = torch.ones(4, dtype=torch.bool)
    assert torch.allclose(_masked_mse(p, t, everyone), F.mse_loss(p, t))
    keep = torch.tensor([True, False, True, True])
    p2 = p.clone()
    p2[1] += 100  # a given sample's prediction does not count
    assert torch.allclose(_masked_mse(p2, t, keep), F.mse_loss(p[keep], t[keep]))
    assert torch.allclose(_masked_mse(p, t, ~everyone), torch.zeros(()))  # nothing to learn: zero, not NaN


def test_modality_guidance_matches_its_definition():
    """x0 = CFG x0 + w (x0 with the other stream + x0 with the other stream as pure noise at sigma 1),
    computed here with separate model calls."""
    torch.manual_seed(0)
    m = OmniForcingTransformer(TINY).eval()
    b = 2
    xv, xa = torch.randn(b, 128, 2, 1, 1), torch.randn(b, 8, 5, 16)
    sv, sa = torch.full((b,), 0.6), torch.full((b,), 0.4)
    ctx = torch.randn(b, 3, TINY.caption_channels)
    text, unc = m.text_kv(ctx, ctx), m.text_kv(torch.zeros_like(ctx), torch.zeros_like(ctx))
    with torch.no_grad():
        base = guided_x0(m, xv, xa, sv, sa, text, unc, 3.0, 5.0)
        got = guided_x0(m, xv, xa, sv, sa, text, unc, 3.0, 5.0, cfg_av=2.0)
        g = torch.Generator().manual_seed(0)
        nv, na = torch.randn(xv.shape, generator=g), torch.randn(xa.shape, generator=g)
        cv, ca = m(xv, xa, sv, sa, text, None)
        _, ba = m(nv, xa, torch.ones(b), sa, text, None)  # video carries nothing
        bv, _ = m(xv, na, sv, torch.ones(b), text, None)  # audio carries nothing
    x0 = lambda x, v, s: x - s.view(-1, *[1] * (x.dim() - 1)) * v  # noqa: E731
    want_v = base[0] + 2.0 * (x0(xv, cv, sv) - x0(xv, bv, sv))
    want_a = base[1] + 2.0 * (x0(xa, ca, sa) - x0(xa, ba, sa))
    assert torch.allclose(got[0], want_v, atol=1e-5) and torch.allclose(got[1], want_a, atol=1e-5)
    assert not torch.allclose(got[1], base[1], atol=1e-3)  # control: the guidance term is not zero


def test_teacher_sampling_with_a_given_stream_keeps_it_clean_and_conditions_the_other():
    """The conditional ODE trajectories: the given modality is the given latents at every kept sigma;
    the other one is sampled, and depends on what was given (negative control: another given stream
    changes it)."""
    from omniforcing_core.toy.stages import teacher_sample
    from omniforcing_core.toy.textenc import TextEncoder
    torch.manual_seed(0)
    m, te = OmniForcingTransformer(TINY).eval(), TextEncoder(TINY.caption_channels).eval()
    sv, sa = (2, 128, 2, 1, 1), (2, 8, 5, 16)
    z = torch.randn(sv)
    with torch.no_grad():
        run = lambda given: teacher_sample(m, te, ["a red ball bounces once"] * 2, sv, sa,  # noqa: E731
                                           torch.Generator().manual_seed(1), steps=4, keep_sigmas=[1.0, 0.5],
                                           given=given)
        v, a, (tv, ta) = run(("video", z))
        _, a2, _ = run(("video", -z))
    assert torch.equal(v, z) and all(torch.equal(tv[:, k], z) for k in range(tv.shape[1]))
    assert not torch.equal(ta[:, 0], ta[:, -1])  # the audio is sampled
    assert (a - a2).abs().max() > 1e-4  # and follows the given video
