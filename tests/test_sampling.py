import pytest
import torch

from omniforcing_core.cache import CachePolicy
from omniforcing_core.config import TINY
from omniforcing_core.embedded import random_model
from omniforcing_core.layout import Clip, make_clip, make_layout
from omniforcing_core.noise import block_noise
from omniforcing_core.prompts import Prompt, PromptError, PromptTimeline
from omniforcing_core.sampling import Guidance, Sampler, generate, generate_reference, stream
from omniforcing_core.schedule import ltx2_sigma_grid, make_schedule, parse_steps


def test_released_schedule_snaps_to_ltx2_grid():
    s = make_schedule()
    assert s.sigmas == pytest.approx((1.0, 0.906229, 0.726524, 0.420719), abs=1e-6)
    assert make_schedule(round_bf16=True).sigmas == (1.0, 0.90625, 0.7265625, 0.419921875)
    g = ltx2_sigma_grid(40)
    assert len(g) == 41 and g[0] == 1.0 and g[-1] == 0.0 and g[-2] == pytest.approx(0.1)
    eight = make_schedule([1000, 993, 987, 981, 975, 909, 725, 421, 0]).sigmas
    assert eight[1:5] == pytest.approx((0.99274, 0.98885, 0.98051, 0.97603), abs=1e-5)
    assert len(make_schedule([1000, 750, 500, 0]).sigmas) == 3


@pytest.mark.parametrize("steps,needle", [
    ([], "at least one"), ([0], "at least one"), ([1000, 1000, 0], "strictly decreasing"),
    ([500, 900, 0], "strictly decreasing"), ([1200, 500], "0..1000"), ([1000, 999, 0], "snap to the same sigma"),
])
def test_invalid_step_lists_are_clear_errors(steps, needle):
    with pytest.raises(ValueError, match=needle):
        make_schedule(steps)
    with pytest.raises(ValueError, match="comma-separated"):
        parse_steps("1000,abc")


def test_noise_is_a_function_of_seed_block_modality_step():
    a = block_noise(3, 2, "video", 1, (2, 4, 3))
    assert torch.equal(a, block_noise(3, 2, "video", 1, (2, 4, 3)))
    assert not torch.equal(a, block_noise(3, 2, "audio", 1, (2, 4, 3)))
    assert not torch.equal(a, block_noise(3, 3, "video", 1, (2, 4, 3)))
    assert torch.equal(a[1], block_noise(4, 2, "video", 1, (1, 4, 3))[0])  # batch item i = seed + i


@pytest.fixture
def setup(tiny64, text64):
    return tiny64, text64, make_clip(make_layout("v2"), 64, 96, seconds=4, seed=11)


def test_stream_equals_offline_equals_masked_reference(setup):
    model, text, spec = setup
    blocks = list(stream(model, spec, text))
    sv = torch.cat([b.video for b in blocks], 2)
    v, a = generate(model, spec, text)
    rv, ra = generate_reference(model, spec, text)
    assert torch.equal(sv, v)
    assert (v - rv).abs().max().item() < 1e-10 and (a - ra).abs().max().item() < 1e-10
    assert [b.block.index for b in blocks] == [0, 1, 2, 3]
    assert v.shape == (1, 128, 13, 2, 3) and a.shape == (1, 8, 101, 16)


def test_inference_mode_streams_like_no_grad(setup):
    """ComfyUI runs nodes under torch.inference_mode, whose tensors have no version counter: the
    per-sigma memo must not need one, and the numbers must not change."""
    model, text, spec = setup
    with torch.no_grad():
        ref = generate(model, spec, text)
    with torch.inference_mode():
        got = generate(model, spec, text)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_first_block_does_not_depend_on_later_noise(setup):
    model, text, spec = setup
    v, _ = generate(model, spec, text)
    short = Clip(spec.layout, spec.height, spec.width, 1, spec.seed)
    v1, _ = generate(model, short, text)
    assert torch.equal(v1, v[:, :, :4])


def test_rolling_window_at_least_length_equals_full_cache_exactly(setup):
    model, text, spec = setup
    full = generate(model, spec, text)
    for w in (3, 10):
        roll = generate(model, spec, text, policy=CachePolicy(window=w))
        assert torch.equal(full[0], roll[0]) and torch.equal(full[1], roll[1])
    small = generate(model, spec, text, policy=CachePolicy(window=1))
    assert not torch.allclose(full[0], small[0])  # eviction really happens


@pytest.mark.parametrize("window", [1, 2])
def test_rolling_window_equals_masked_reference_with_sliding_window_mask(setup, window):
    """The ring cache (keys in slot order, evicted blocks overwritten) must equal a full-sequence
    forward whose masks show each query only the sink block and the last `window` blocks."""
    model, text, spec = setup
    v, a = generate(model, spec, text, policy=CachePolicy(window=window))
    rv, ra = generate_reference(model, spec, text, policy=CachePolicy(window=window))
    assert (v - rv).abs().max().item() < 1e-10 and (a - ra).abs().max().item() < 1e-10
    s = Sampler(model, spec, text, policy=CachePolicy(window=window))
    for k, _ in enumerate(s):
        assert sorted(s.backend.cache.visible_blocks()) == sorted({0, *range(max(1, k - window), k + 1)})


def test_cache_bytes_stay_flat_once_window_is_full():
    model = random_model(TINY.replace(num_layers=1), dtype=torch.float32)
    text = model.text_kv(torch.randn(1, 3, TINY.caption_channels), torch.randn(1, 3, TINY.caption_channels))
    spec = Clip(make_layout("v2"), 32, 32, 24, seed=0)
    s = Sampler(model, spec, text, policy=CachePolicy(window=4), schedule=make_schedule([1000, 0]))
    sizes = [s.run_block(b) and s.cache_bytes() for b in spec.blocks()]
    assert len(set(sizes)) == 1  # the ring is allocated whole at the first block and never moves
    full = Sampler(model, Clip(make_layout("v2"), 32, 32, None), text, schedule=make_schedule([1000, 0]))
    grow = [full.run_block(b) and full.cache_bytes() for b in spec.layout.iter_blocks(20)]
    assert grow[-1] > grow[9] > grow[1]  # keep-all grows in chunks of 8 blocks


def test_rebased_rope_runs_past_20_seconds_and_matches_absolute_before_eviction():
    model = random_model(TINY.replace(num_layers=1), dtype=torch.float64)
    ctx = torch.randn(1, 3, TINY.caption_channels, dtype=torch.float64)
    text = model.text_kv(ctx, ctx)
    sch = make_schedule([1000, 500, 0])
    spec = Clip(make_layout("v2"), 32, 32, 4, seed=1)
    a = generate(model, spec, text, schedule=sch, policy=CachePolicy(window=3))
    b = generate(model, spec, text, schedule=sch, policy=CachePolicy(window=3, rebase_rope=True))
    assert (a[0] - b[0]).abs().max().item() < 1e-10  # no eviction yet: same positions
    long = Clip(make_layout("v2"), 32, 32, 30, seed=1)
    s = Sampler(model, long, text, schedule=sch, policy=CachePolicy(window=2, rebase_rope=True))
    last = None
    for res in s:
        last = res
    assert last.block.t_end == 30.0 and torch.isfinite(last.video).all()
    # the last block's queries sit at re-based block W+1 = 3, inside the 20 s range
    assert CachePolicy(window=2, rebase_rope=True).rebase_shift(29) == 26


def test_prompt_switch_plain_and_recache(setup):
    model, text, spec = setup
    g = torch.Generator().manual_seed(9)
    other_ctx = torch.randn(1, 7, model.config.caption_channels, generator=g, dtype=torch.float64)
    other = model.text_kv(other_ctx, other_ctx)
    plain = PromptTimeline((Prompt(0, text), Prompt(2, other)))
    rec = plain.with_recache(True)
    pv, _ = generate(model, spec, plain)
    rv, _ = generate(model, spec, rec)
    base, _ = generate(model, spec, text)
    # blocks before the switch are untouched; after it both differ from the single prompt
    assert torch.equal(pv[:, :, :7], base[:, :, :7]) and torch.equal(rv[:, :, :7], base[:, :, :7])
    assert not torch.allclose(pv[:, :, 7:], base[:, :, 7:])
    assert not torch.allclose(rv[:, :, 7:], pv[:, :, 7:])
    # re-caching re-encodes the history under the new prompt: the prefix re-run does exactly that
    ref, _ = generate_reference(model, spec, plain)
    assert (rv - ref).abs().max().item() < 1e-10
    blocks = list(stream(model, spec, plain))
    assert [b.prompt_index for b in blocks] == [0, 0, 1, 1]
    with pytest.raises(PromptError, match="must start at 0s"):
        Sampler(model, spec, PromptTimeline((Prompt(1, text),)))


def test_image_to_audio_video_holds_the_first_latent_clean(setup):
    model, text, spec = setup
    first = torch.randn(1, 128, 1, 2, 3, dtype=torch.float64)
    v, _ = generate(model, spec, text, first_frame=first)
    rv, _ = generate_reference(model, spec, text, first_frame=first)
    assert torch.equal(v[:, :, :1], first)
    assert (v - rv).abs().max().item() < 1e-10
    free, _ = generate(model, spec, text)
    assert not torch.allclose(v[:, :, 1:4], free[:, :, 1:4])
    with pytest.raises(ValueError, match="one latent frame"):
        Sampler(model, spec, text, first_frame=torch.randn(1, 128, 2, 2, 3))


@pytest.mark.parametrize("kind,sinks", [("prefix", 0), ("prefix", 2)])
def test_prefix_layout_streams_and_i2av(kind, sinks):
    model = random_model(TINY.replace(num_audio_sinks=sinks), dtype=torch.float64)
    ctx = torch.randn(1, 3, TINY.caption_channels, dtype=torch.float64)
    text = model.text_kv(ctx, ctx)
    spec = make_clip(make_layout(kind, num_sinks=sinks), 32, 64, seconds=2, seed=2)
    first = torch.randn(1, 128, 1, 1, 2, dtype=torch.float64)
    v, a = generate(model, spec, text, first_frame=first)
    rv, ra = generate_reference(model, spec, text, first_frame=first)
    assert torch.equal(v[:, :, :1], first) and (v - rv).abs().max().item() < 1e-10
    assert (a - ra).abs().max().item() < 1e-10


def test_cfg_matches_its_definition_and_reference(setup):
    model, text, spec = setup
    neg = model.text_kv(torch.zeros(1, 7, model.config.caption_channels, dtype=torch.float64),
                        torch.zeros(1, 7, model.config.caption_channels, dtype=torch.float64))
    short = Clip(spec.layout, spec.height, spec.width, 1, spec.seed)
    sch = make_schedule([1000, 0])  # one step: x0 = u + s (c - u) exactly, checkable by hand
    gv, ga = generate(model, short, text, guidance=Guidance(neg, 3.0, 5.0), schedule=sch)
    cv, ca = generate(model, short, text, schedule=sch)
    uv, ua = generate(model, short, neg, schedule=sch)
    assert (gv - (uv + 3.0 * (cv - uv))).abs().max().item() < 1e-10
    assert (ga - (ua + 5.0 * (ca - ua))).abs().max().item() < 1e-10
    g2 = generate(model, spec, text, guidance=Guidance(neg, 3.0, 5.0))
    r2 = generate_reference(model, spec, text, guidance=Guidance(neg, 3.0, 5.0))
    assert (g2[0] - r2[0]).abs().max().item() < 1e-10


def test_batch_items_equal_single_runs_with_offset_seeds(tiny64):
    ctx = torch.randn(1, 5, tiny64.config.caption_channels, dtype=torch.float64)
    t1 = tiny64.text_kv(ctx, ctx)
    t2 = tiny64.text_kv(ctx.repeat(2, 1, 1), ctx.repeat(2, 1, 1))
    lay = make_layout("v2")
    v2, _ = generate(tiny64, Clip(lay, 32, 32, 2, seed=5, batch=2), t2)
    v1, _ = generate(tiny64, Clip(lay, 32, 32, 2, seed=6), t1)
    assert (v2[1:] - v1).abs().max().item() < 1e-10


def test_should_stop_interrupts_between_steps(setup):
    model, text, spec = setup
    calls = []
    s = Sampler(model, spec, text, should_stop=lambda: len(calls) > 5 or calls.append(1))
    done = []
    with pytest.raises(InterruptedError):
        for r in s:
            done.append(r)
    assert len(done) == 1  # the finished block was delivered before the stop


def test_a_non_finite_block_stops_the_stream_with_a_clear_error(setup):
    from omniforcing_core.sampling import NonFiniteError
    model, text, spec = setup
    ok = list(stream(model, Clip(spec.layout, spec.height, spec.width, 2, spec.seed), text))
    assert len(ok) == 2  # negative control: finite weights stream on
    broken = random_model(TINY, dtype=torch.float64)
    with torch.no_grad():
        broken.proj_out.bias[0] = float("nan")
    done = []
    with pytest.raises(NonFiniteError, match=r"block 0 .*NaN/Inf video.*latents.*dtype"):
        for r in stream(broken, spec, text):
            done.append(r)
    assert done == []


def test_noise_is_counter_based_and_equals_an_independent_python_computation():
    """Element j of a block's noise is Box-Muller over splitmix64 hashes of counters, computed here in
    plain Python: the tensors made on any device must be these numbers."""
    import math

    from omniforcing_core.noise import _mix, _splitmix64_int

    def unit(z):
        return ((z >> 11) + 0.5) * 2.0 ** -53

    k = _splitmix64_int(_mix(7, 3, "audio", 2))
    x = block_noise(7, 3, "audio", 2, (1, 8, 5, 16), dtype=torch.float64).flatten()
    for j in (0, 1, 2, 101, 639):
        p = j // 2
        u1, u2 = unit(_splitmix64_int((2 * p) ^ k)), unit(_splitmix64_int((2 * p + 1) ^ k))
        r, th = math.sqrt(-2 * math.log(u1)), 2 * math.pi * u2
        want = r * math.cos(th) if j % 2 == 0 else r * math.sin(th)
        assert abs(x[j].item() - want) < 1e-6 * max(1.0, abs(want))  # float32 numbers (noise is drawn in float32)
    big = block_noise(0, 0, "video", 0, (1, 128, 4, 8, 8))
    assert abs(big.mean().item()) < 0.02 and abs(big.std().item() - 1) < 0.02


def test_noise_is_made_on_the_gpu_without_syncs_and_equals_the_cpu_numbers():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.cuda.set_sync_debug_mode("error")
    try:
        g = block_noise(5, 1, "video", 0, (2, 128, 3, 4, 6), device="cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    c = block_noise(5, 1, "video", 0, (2, 128, 3, 4, 6))
    assert (g.cpu() - c).abs().max().item() < 1e-6
