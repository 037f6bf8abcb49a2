"""Issue #6 core changes: grad-safe cache, sink positions ablation, the training rollout's exit step, audio sigma map."""
import dataclasses

import pytest
import torch

from omniforcing_core.config import TINY
from omniforcing_core.embedded import random_model
from omniforcing_core.layout import DEFAULT_TIME, Clip, make_layout
from omniforcing_core.rope import RopeConfig, audio_self_table, identity_table, sink_times
from omniforcing_core.sampling import generate, generate_reference
from omniforcing_core.toy.stages import audio_block_index, rollout

pytestmark = pytest.mark.usefixtures("one_thread")



def _text(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(1, 5, m.config.caption_channels, generator=g, dtype=m.dtype)
    return m.text_kv(c, c)


def test_cache_grad_rollout_backward_matches_no_grad_values():
    """Exit-step forwards with grad over several blocks: backward works (no in-place error) and the
    values equal the no-grad rollout."""
    m = random_model(TINY, seed=0).requires_grad_(True)
    clip = Clip(make_layout("v2"), 64, 64, 3, seed=5)
    text = _text(m)
    with torch.no_grad():
        ref, _, _ = rollout(m, clip, text, exit_step=2)
    with torch.enable_grad():
        v, a, sampler = rollout(m, clip, text, exit_step=2)
        loss = v.square().mean() + a.square().mean()
        loss.backward()
    assert torch.allclose(v, ref, atol=1e-5)
    g = m.patchify_proj.weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # history carries no gradient: the cache buffers never require grad
    assert not any(t.requires_grad for layer in sampler.backend.cache.k for t in layer.values())


def test_exit_at_the_last_step_is_inference():
    m = random_model(TINY, seed=0)
    clip = Clip(make_layout("v2"), 64, 64, 2, seed=3)
    text = _text(m)
    v1, a1 = generate(m, clip, text)
    with torch.no_grad():
        v2, a2, _ = rollout(m, clip, text, exit_step=3)
        v3, _, _ = rollout(m, clip, text, exit_step=2)
    assert torch.equal(v1, v2) and torch.equal(a1, a2)  # exit at the last step == full inference
    assert not torch.allclose(v1, v3)  # negative control: an earlier exit is another output
    with pytest.raises(ValueError, match="exit_step"):
        rollout(m, clip, text, exit_step=4)


def test_incremental_sink_positions_option():
    cfg = RopeConfig("interleaved", "float64", sink_positions="incremental")
    tab = audio_self_table(range(3), 4, DEFAULT_TIME, 32, 2, cfg)
    ident = identity_table(4, 32, 2, "interleaved", torch.float64)
    assert not torch.allclose(tab.cos[:4], ident.cos)  # sinks rotated ...
    assert torch.allclose(sink_times(4, DEFAULT_TIME), torch.tensor([-0.16, -0.12, -0.08, -0.04], dtype=torch.float64))
    default = audio_self_table(range(3), 4, DEFAULT_TIME, 32, 2, RopeConfig("interleaved", "float64"))
    assert torch.equal(default.cos[:4], ident.cos)  # ... the default stays identity
    assert torch.equal(default.cos[4:], tab.cos[4:])
    with pytest.raises(ValueError):
        RopeConfig(sink_positions="absolute")


def test_incremental_sinks_model_cached_equals_masked():
    cfg = TINY.replace(num_audio_sinks=2, rope=RopeConfig("interleaved", "float64", sink_positions="incremental"))
    m = random_model(cfg, seed=0, dtype=torch.float64)
    lay = make_layout("prefix", num_sinks=2)
    spec = Clip(lay, 64, 64, 3, seed=1)
    text = _text(m)
    a = generate(m, spec, text)
    b = generate_reference(m, spec, text)
    assert torch.allclose(a[0], b[0], atol=1e-10) and torch.allclose(a[1], b[1], atol=1e-10)


def test_audio_sigma_follows_block_table_not_proportional():
    lay = make_layout("v2")
    blk = audio_block_index(lay, 16, 126, "block")
    assert [int(blk[i]) for i in (25, 26, 50, 51, 100, 101)] == [0, 1, 1, 2, 3, 4]
    prop = audio_block_index(lay, 16, 126, "proportional")
    # the official mapping (reference 8.2): boundaries at 32, 55, 79, 102 instead of 26, 51, 76, 101
    bounds = [i for i in range(1, 126) if prop[i] != prop[i - 1]]
    assert bounds == [32, 55, 79, 102]
