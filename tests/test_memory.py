"""Memory of a stream (issue 15 item 3): a keep-all cache grows in fixed chunks and gives the same
outputs as one contiguous buffer (the chunks are merged by their log-sum-exp, never copied); the cache
plan picks a window for streams longer than the model's training length and states its bytes before
anything runs, exactly what the stream then takes."""
from __future__ import annotations

import pytest
import torch

from omniforcing_core.budget import TRAINED_BLOCKS, plan_cache
from omniforcing_core.cache import CachePolicy
from omniforcing_core.layers import KVChunks, chunked_attention, sdpa_attention
from omniforcing_core.layout import Clip, make_clip, make_layout
from omniforcing_core.prompts import Prompt, PromptTimeline
from omniforcing_core.sampling import Sampler, generate, generate_reference


@pytest.fixture
def clip6():
    return make_clip(make_layout("v2"), 64, 96, seconds=6, seed=5)


def test_chunked_attention_equals_one_softmax_over_all_keys():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 23, 16, generator=g, dtype=torch.float64), torch.randn(2, 23, 16, generator=g,
                                                                                  dtype=torch.float64)
    mask = torch.rand(23, generator=g) > 0.4
    mask[0] = True
    cuts = [0, 7, 8, 23]
    kv = KVChunks([k[:, a:b] for a, b in zip(cuts, cuts[1:])], [v[:, a:b] for a, b in zip(cuts, cuts[1:])])
    for m in (None, mask):
        want = sdpa_attention(q, k, v, 2, None if m is None else m.view(1, -1))
        assert (chunked_attention(q, kv, 2, m) - want).abs().max().item() < 1e-14
    assert (chunked_attention(q.float(), KVChunks([t.float() for t in kv.keys], [t.float() for t in kv.values]), 2)
            - sdpa_attention(q.float(), k.float(), v.float(), 2)).abs().max().item() < 1e-5


@pytest.mark.parametrize("chunk", [1, 2])
def test_keep_all_in_chunks_equals_one_buffer_and_the_reference(tiny64, text64, clip6, chunk):
    """6 blocks in chunks of 1 or 2 blocks read across up to 6 chunks: the same as a ring that holds the
    whole stream in one buffer, and as the masked prefix re-run (float64)."""
    v, a = generate(tiny64, clip6, text64, policy=CachePolicy(chunk_blocks=chunk))
    ov, oa = generate(tiny64, clip6, text64, policy=CachePolicy(window=10))
    rv, ra = generate_reference(tiny64, clip6, text64)
    assert (v - ov).abs().max().item() < 1e-12 and (a - oa).abs().max().item() < 1e-12
    assert (v - rv).abs().max().item() < 1e-10 and (a - ra).abs().max().item() < 1e-10
    s = Sampler(tiny64, clip6, text64, policy=CachePolicy(chunk_blocks=chunk))
    list(s)
    assert len(s.backend.cache.k_chunks[0]["video_self"]) == -(-5 // chunk)  # 5 slots after the sink


@pytest.mark.parametrize("switch", [3, 5])
@pytest.mark.parametrize("chunk", [1, 8])
def test_recache_across_chunks_equals_the_prefix_rerun(tiny64, text64, clip6, switch, chunk):
    """A prompt switch re-encodes the history in place, each old block under a key mask that hides its
    successors; with chunks of one block the masks span several chunks and whole chunks are hidden.
    Equal to the reference, which re-runs the prefix under the new prompt."""
    g = torch.Generator().manual_seed(9)
    ctx = torch.randn(1, 7, tiny64.config.caption_channels, generator=g, dtype=torch.float64)
    plan = PromptTimeline((Prompt(0, text64), Prompt(switch, tiny64.text_kv(ctx, ctx)))).with_recache(True)
    v, _ = generate(tiny64, clip6, plan, policy=CachePolicy(chunk_blocks=chunk))
    rv, _ = generate_reference(tiny64, clip6, plan)
    assert (v - rv).abs().max().item() < 1e-10


def test_the_plan_picks_a_window_past_the_trained_length_and_states_the_bytes(tiny64, text64):
    lay = make_layout("v2")
    short, long = Clip(lay, 64, 96, TRAINED_BLOCKS), Clip(lay, 64, 96, TRAINED_BLOCKS + 3)
    assert plan_cache(tiny64, short).policy == CachePolicy()
    p = plan_cache(tiny64, long)
    assert p.policy.window == TRAINED_BLOCKS - 1 and "trained" in p.reason
    assert plan_cache(tiny64, Clip(lay, 64, 96, None)).policy.window == TRAINED_BLOCKS - 1
    assert plan_cache(tiny64, long, window=0).policy == CachePolicy()  # asked to keep everything
    assert plan_cache(tiny64, long, window=2).policy.window == 2
    assert "GiB" in p.describe() and "window 4" in p.describe()
    for clip in (short, long):  # the stated cache bytes are what the stream takes
        plan = plan_cache(tiny64, clip)
        s = Sampler(tiny64, clip, text64, policy=plan.policy)
        list(s)
        assert s.cache_bytes() == plan.cache_bytes
        assert plan.total_bytes > plan.cache_bytes
