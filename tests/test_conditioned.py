"""Streams conditioned on a given modality (A->V, V->A): the given latents are held clean at sigma 0,
only the other modality is denoised, and both enter the KV cache as a clean refresh would."""
import pytest
import torch

from omniforcing_core.cache import CachePolicy
from omniforcing_core.layout import Clip, make_clip, make_layout
from omniforcing_core.prompts import Prompt, PromptTimeline
from omniforcing_core.sampling import (Given, GivenError, Guidance, Sampler, generate, generate_reference,
                                       stream)

LAYOUT = make_layout("v2")


@pytest.fixture
def setup(tiny64, text64):
    return tiny64, text64, make_clip(LAYOUT, 64, 96, seconds=4, seed=11)


def given_latents(modality, clip, seconds_more=0, seed=5):
    """A given stream longer than the clip (it is cut on block boundaries)."""
    long = make_clip(clip.layout, clip.height, clip.width, seconds=clip.num_blocks + seconds_more)
    shape = long.video_shape() if modality == "video" else long.audio_shape()
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def other(modality):
    return "audio" if modality == "video" else "video"


@pytest.mark.parametrize("modality", ["audio", "video"])
def test_given_modality_comes_out_exactly_and_the_other_follows_it(setup, modality):
    model, text, clip = setup
    lat = given_latents(modality, clip, seconds_more=3)  # longer than the clip: the rest is unused
    g = Given(modality, lat)
    v, a = generate(model, clip, text, given=g)
    out = {"video": v, "audio": a}
    n = clip.video_latents if modality == "video" else clip.audio_latents
    assert torch.equal(out[modality], lat[:, :, :n])  # bit for bit, every block
    free = dict(zip(("video", "audio"), generate(model, clip, text)))
    gen = out[other(modality)]
    assert gen.shape == free[other(modality)].shape
    # the same seed draws the same noise: what differs is the conditioning (per block, from block 0 on)
    for b in clip.blocks():
        s, e = (b.video_start, b.video_end) if modality == "audio" else (b.audio_start, b.audio_end)
        assert (gen[:, :, s:e] - free[other(modality)][:, :, s:e]).abs().max().item() > 1e-3
    # a different given stream gives a different generated modality (negative control for "ignored")
    v2, a2 = generate(model, clip, text, given=Given(modality, given_latents(modality, clip, seed=6)))
    assert not torch.allclose({"video": v2, "audio": a2}[other(modality)], gen)
    # stream == offline == masked prefix re-run (the reference)
    blocks = list(stream(model, clip, text, given=g))
    assert torch.equal(torch.cat([getattr(r, other(modality)) for r in blocks], 2), gen)
    rv, ra = generate_reference(model, clip, text, given=g)
    ref = {"video": rv, "audio": ra}
    assert torch.equal(ref[modality], lat[:, :, :n])
    assert (ref[other(modality)] - gen).abs().max().item() < 1e-10


def test_given_latents_enter_the_cache_as_a_clean_refresh_computed_by_hand(setup):
    """After each block the cache holds the K/V of the clean block (given audio + generated video at
    sigma 0). The same K/V computed here straight from the model, block by block, with nothing of the
    sampler, must be the sampler's cache bit for bit."""
    model, text, clip = setup
    lat = given_latents("audio", clip)
    s = Sampler(model, clip, text, given=Given("audio", lat))
    results = list(s)
    hand = model.new_cache(clip.layout, clip.grid, CachePolicy(), 1, dtype=model.dtype)
    for r in results:
        b = r.block
        ropes = model.prepare_block(hand, b, clip.grid)
        model.forward_block(r.video, lat[:, :, b.audio_start:b.audio_end], torch.zeros(1), torch.zeros(1), text,
                            hand, ropes)
    got = s.backend.cache
    compared = 0
    for layer in range(model.config.num_layers):
        for kind, kt in hand.k[layer].items():
            n = hand.valid_len(kind)
            assert torch.equal(got.k[layer][kind][:, :n], kt[:, :n]) and torch.equal(got.v[layer][kind][:, :n],
                                                                                    hand.v[layer][kind][:, :n])
            compared += 1
    assert compared == 4 * model.config.num_layers
    # negative control: the noisy given latents of the first step would be a different cache
    bad = model.new_cache(clip.layout, clip.grid, CachePolicy(), 1, dtype=model.dtype)
    b0 = results[0].block
    model.forward_block(results[0].video, lat[:, :, :b0.audio_end], torch.zeros(1), torch.full((1,), 0.5), text,
                        bad, model.prepare_block(bad, b0, clip.grid))
    assert not torch.equal(bad.k[0]["audio_self"][:, :bad.valid_len("audio_self")],
                           got.k[0]["audio_self"][:, :bad.valid_len("audio_self")])


@pytest.mark.parametrize("window", [1, 2])
def test_rolling_window_equals_sliding_window_reference(setup, window):
    model, text, clip = setup
    g = Given("audio", given_latents("audio", clip))
    v, a = generate(model, clip, text, given=g, policy=CachePolicy(window=window))
    rv, ra = generate_reference(model, clip, text, given=g, policy=CachePolicy(window=window))
    assert (v - rv).abs().max().item() < 1e-10 and torch.equal(a, ra)
    if window == 1:  # 4 blocks: window 1 evicts block 1 for block 3, so this is not the keep-all run
        assert not torch.allclose(v, generate(model, clip, text, given=g)[0])


def test_prompt_schedule_with_recache_and_cfg_equal_the_reference(setup):
    model, text, clip = setup
    ctx = torch.randn(1, 7, model.config.caption_channels, generator=torch.Generator().manual_seed(9),
                      dtype=torch.float64)
    other_text = model.text_kv(ctx, ctx)
    plan = PromptTimeline((Prompt(0, text), Prompt(2, other_text))).with_recache(True)
    neg = model.text_kv(torch.zeros_like(ctx), torch.zeros_like(ctx))
    guid = Guidance(neg, 3.0, 5.0)
    g = Given("video", given_latents("video", clip))
    v, a = generate(model, clip, plan, given=g, guidance=guid)
    rv, ra = generate_reference(model, clip, plan, given=g, guidance=guid)
    assert torch.equal(v, g.latents[:, :, :13]) and torch.equal(rv, v)
    assert (a - ra).abs().max().item() < 1e-10
    unguided = generate(model, clip, plan, given=g)[1]
    assert not torch.allclose(a, unguided)  # CFG really acted on the generated audio


def test_cfg_on_the_generated_modality_matches_its_definition(setup):
    model, text, clip = setup
    short = Clip(clip.layout, clip.height, clip.width, 1, clip.seed)
    from omniforcing_core.schedule import make_schedule
    sch = make_schedule([1000, 0])  # one step: x0 = u + s (c - u), checkable by hand
    neg = model.text_kv(torch.zeros(1, 7, model.config.caption_channels, dtype=torch.float64),
                        torch.zeros(1, 7, model.config.caption_channels, dtype=torch.float64))
    g = Given("audio", given_latents("audio", short))
    gv, ga = generate(model, short, text, guidance=Guidance(neg, 3.0, 5.0), schedule=sch, given=g)
    cv, _ = generate(model, short, text, schedule=sch, given=g)
    uv, _ = generate(model, short, neg, schedule=sch, given=g)
    assert (gv - (uv + 3.0 * (cv - uv))).abs().max().item() < 1e-10
    assert torch.equal(ga, g.latents[:, :, :26])


def test_batch_broadcasts_one_given_stream(tiny64):
    ctx = torch.randn(1, 5, tiny64.config.caption_channels, dtype=torch.float64)
    t2 = tiny64.text_kv(ctx.repeat(2, 1, 1), ctx.repeat(2, 1, 1))
    t1 = tiny64.text_kv(ctx, ctx)
    c2 = Clip(LAYOUT, 32, 32, 2, seed=5, batch=2)
    lat = given_latents("audio", Clip(LAYOUT, 32, 32, 2))
    v2, a2 = generate(tiny64, c2, t2, given=Given("audio", lat))
    v1, _ = generate(tiny64, Clip(LAYOUT, 32, 32, 2, seed=6), t1, given=Given("audio", lat))
    assert torch.equal(a2, lat.expand(2, -1, -1, -1)) and (v2[1:] - v1).abs().max().item() < 1e-10


def test_an_open_ended_stream_ends_with_the_given_stream(setup):
    model, text, clip = setup
    lat = given_latents("audio", clip)[:, :, :-3]  # 3.88 s of latents: 3 whole blocks
    blocks = list(stream(model, Clip(LAYOUT, clip.height, clip.width, None, clip.seed), text,
                         given=Given("audio", lat)))
    assert [r.block.index for r in blocks] == [0, 1, 2]
    assert torch.equal(torch.cat([r.audio for r in blocks], 2), lat[:, :, :76])


def test_first_frame_with_given_audio_and_conflicts(setup):
    model, text, clip = setup
    first = torch.randn(1, 128, 1, 2, 3, dtype=torch.float64)
    g = Given("audio", given_latents("audio", clip))
    v, a = generate(model, clip, text, first_frame=first, given=g)
    assert torch.equal(v[:, :, :1], first) and torch.equal(a, g.latents[:, :, :101])
    with pytest.raises(GivenError, match="first frame and a given video"):
        Sampler(model, clip, text, first_frame=first, given=Given("video", given_latents("video", clip)))


def test_shorter_or_misshapen_given_input_is_a_clear_error(setup):
    model, text, clip = setup
    short = given_latents("audio", clip)[:, :, :80]  # 3 whole blocks of the 4 asked
    with pytest.raises(GivenError, match=r"covers 3 s \(80 latents = 3 whole blocks\) but 4 s \(4 blocks, 101 "
                                         r"latents\) were asked: ask for at most 3 s"):
        Sampler(model, clip, text, given=Given("audio", short))
    with pytest.raises(GivenError, match="give at least 1 s"):
        Sampler(model, clip, text, given=Given("video", given_latents("video", clip)[:, :, :3]))
    with pytest.raises(GivenError, match=r"the clip needs \[1 or 1, 128, frames, 2, 3\]; encode the video at 96x64"):
        Sampler(model, clip, text, given=Given("video", torch.zeros(1, 128, 13, 3, 3)))
    with pytest.raises(GivenError, match=r"must be \[B, 8, T, 16\]"):
        Given("audio", torch.zeros(1, 128, 13, 2, 3))
    with pytest.raises(GivenError, match="not one of video, audio"):
        Given("text", torch.zeros(1, 8, 26, 16))
    Sampler(model, clip, text, given=Given("audio", given_latents("audio", clip)))  # exactly enough is fine


# -- the output carries the user's own media ------------------------------------------------------------

class _Writer:
    """Records what the streamer hands a writer (stereo, like the live writer)."""

    channels = 2

    def __init__(self):
        self.frames, self.audio, self.closed = [], [], False

    def write(self, frames, audio):
        self.frames.append(torch.as_tensor(frames))
        self.audio.append(torch.as_tensor(audio))

    def write_audio(self, audio):
        self.audio.append(torch.as_tensor(audio))

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def tiny32():
    from omniforcing_core.config import TINY
    from omniforcing_core.embedded import random_model, toy_text
    m = random_model(TINY)
    return m, toy_text(m, "a red ball bounces")


def _plan():
    from harness.av import reach_decoders
    from omniforcing_core.decode import TemporalContext
    from omniforcing_core.streaming import decode_plan, stream_time
    t = stream_time(24000)
    return decode_plan("exact", reach_decoders(TemporalContext(1, 1), TemporalContext(2, 1), t), t)


def test_the_stream_writes_the_original_audio_on_the_stream_clock(tiny32):
    from omniforcing_core.streaming import GivenMedia, run_stream
    model, text = tiny32
    clip = make_clip(LAYOUT, 64, 64, seconds=3, seed=3)
    lat = torch.randn(clip.audio_shape(), generator=torch.Generator().manual_seed(1))
    wave = 0.1 * torch.randn(1, 3 * 24000, generator=torch.Generator().manual_seed(2))  # mono, exactly 3 s
    writer, chunks = _Writer(), []
    run = run_stream(Sampler(model, clip, text, given=Given("audio", lat)), _plan(), writer,
                     given=GivenMedia("audio", wave), on_block=lambda r, c: chunks.append(c))
    out = run.audio()
    n = clip.layout.time.audio.frames_for_latents(clip.audio_latents) * 240  # what the decoder would give: 72240
    assert out.shape == (2, n) and writer.closed
    assert torch.equal(out[:, :72000], wave.expand(2, -1)) and not out[:, 72000:].any()  # silence after the end
    assert torch.equal(torch.cat(writer.audio, -1), out)  # the writer got the very same samples
    # each chunk's audio starts on its first frame's sample (the aligner's equal spans)
    t = clip.layout.time
    assert all(c.first_sample == t.sample_at_frame(c.first_frame) for c in chunks if c.frames is not None)
    # negative control: without the original the file would carry the decode of the latents
    plain = run_stream(Sampler(model, clip, text, given=Given("audio", lat)), _plan())
    assert plain.audio().shape == out.shape and not torch.allclose(plain.audio(), out)
    assert torch.equal(plain.video(), run.video())  # the video side is untouched


def test_the_stream_writes_the_original_frames_and_holds_the_last(tiny32):
    from omniforcing_core.streaming import GivenMedia, run_stream
    model, text = tiny32
    clip = make_clip(LAYOUT, 64, 64, seconds=2, seed=3)
    lat = torch.randn(clip.video_shape(), generator=torch.Generator().manual_seed(1))
    frames = torch.rand(48, 64, 64, 3, generator=torch.Generator().manual_seed(2))  # 2 s: the stream shows 49
    run = run_stream(Sampler(model, clip, text, given=Given("video", lat)), _plan(), given=GivenMedia("video", frames))
    v = run.video()
    assert v.shape == (49, 64, 64, 3) and torch.equal(v[:48], frames) and torch.equal(v[48], frames[47])
    assert run.audio().shape[-1] == t_samples(clip)


def t_samples(clip):
    return clip.layout.time.audio.frames_for_latents(clip.audio_latents) * clip.layout.time.samples_per_mel_frame


def test_given_media_errors_name_the_fix():
    from omniforcing_core.streaming import AVStreamer, GivenMedia
    with pytest.raises(GivenError, match=r"must be \[N, H, W, 3\]"):
        GivenMedia("video", torch.zeros(3, 8, 8))
    with pytest.raises(GivenError, match="empty"):
        GivenMedia("audio", torch.zeros(2, 0))
    with pytest.raises(GivenError, match="3 channels, the output 2: give mono or 2-channel audio"):
        AVStreamer(_plan(), _Writer(), given=GivenMedia("audio", torch.zeros(3, 10)))
