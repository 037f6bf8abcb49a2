import itertools
import math

import pytest
import torch

from omniforcing_core.layout import make_clip, make_layout
from omniforcing_core.masks import build_masks


def _block_of_time(kind: str, frame: int, rate: float) -> int:
    """Independent rule from physical time: block k covers the k-th second (v2: frame 0 belongs to
    the first second; prefix: frame 0 alone is block 0)."""
    t = frame / rate
    if kind == "v2":
        return max(0, math.ceil(t - 1e-12) - 1)
    return math.ceil(t - 1e-12)


def _brute_force(kind, clip, sinks):
    lay = clip.layout
    tv, ta = lay.time.video, lay.time.audio
    # a latent belongs to the block of the last frame it holds
    vb = [_block_of_time(kind, tv.latent_bounds_frames(f)[1] - 1, lay.time.fps) for f in range(clip.video_latents)]
    ab = [_block_of_time(kind, ta.latent_bounds_frames(a)[1] - 1, lay.time.mel_rate) for a in range(clip.audio_latents)]
    vt = [b for b in vb for _ in range(clip.tokens_per_latent)]
    at = [0] * sinks + ab
    m = lambda q, k: torch.tensor([[kb <= qb for kb in k] for qb in q])  # noqa: E731
    return m(vt, vt), m(at, at), m(vt, at), m(at, vt), vt, at


@pytest.mark.parametrize("kind,sinks", [("v2", 0), ("prefix", 0), ("prefix", 4)])
def test_masks_equal_brute_force_from_physical_time(kind, sinks):
    lay = make_layout(kind, num_sinks=sinks)
    clip = make_clip(lay, 64, 64, seconds=4)
    got = build_masks(lay, clip.video_latents, clip.audio_latents, clip.tokens_per_latent)
    vv, aa, a2v, v2a, _, _ = _brute_force(kind, clip, sinks)
    assert torch.equal(got.video_self, vv)
    assert torch.equal(got.audio_self, aa)
    assert torch.equal(got.a2v, a2v)
    assert torch.equal(got.v2a, v2a)


@pytest.mark.parametrize("kind,sinks", [("v2", 0), ("prefix", 3)])
def test_no_future_leakage_and_full_visibility_inside_a_block(kind, sinks):
    lay = make_layout(kind, num_sinks=sinks)
    clip = make_clip(lay, 64, 64, seconds=3)
    m = build_masks(lay, clip.video_latents, clip.audio_latents, clip.tokens_per_latent)
    _, _, _, _, vt, at = _brute_force(kind, clip, sinks)
    # physical end time of every token's block; no query may see a key from a later block
    for mask, q, k in ((m.video_self, vt, vt), (m.audio_self, at, at), (m.a2v, vt, at), (m.v2a, at, vt)):
        for i, j in itertools.product(range(0, len(q), 7), range(0, len(k), 5)):
            assert bool(mask[i, j]) == (k[j] <= q[i])
        assert mask.any(1).all()  # no fully masked row (no NaNs)
    # sinks are visible to every audio and video query
    if sinks:
        assert m.audio_self[:, :sinks].all() and m.a2v[:, :sinks].all()
    # the two cross masks are block-aligned transposes of each other's rule
    assert torch.equal(m.a2v, torch.tensor(vt)[:, None] >= torch.tensor(at)[None, :])
