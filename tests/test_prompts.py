"""Timed prompts: parsing, plans, host text contexts -> text K/V, and when switches really happen."""
import pytest
import torch

from omniforcing_core.config import ConnectorConfig, TINY
from omniforcing_core.embedded import random_model
from omniforcing_core.layout import make_clip, make_layout
from omniforcing_core.prompts import (PromptError, PromptPlan, TimedContext, TimedText, build_prompts,
                                      context_to_text_kv, pad_text_kv, parse_time, parse_timed_prompts,
                                      switch_report)
from omniforcing_core.sampling import StreamSpec, generate


@pytest.mark.parametrize("token,seconds", [("8", 8), ("8s", 8), ("8.5s", 8.5), ("1m20s", 80), ("1m", 60),
                                           ("1:20", 80), ("0:08.5", 8.5), (" 3 s ", 3)])
def test_parse_time(token, seconds):
    assert parse_time(token) == pytest.approx(seconds)


@pytest.mark.parametrize("token", ["", "abc", "8x", "-1s", "1:xx"])
def test_parse_time_rejects(token):
    with pytest.raises(PromptError, match="not a time"):
        parse_time(token)


def test_parse_timed_prompts_pipes_and_lines():
    assert parse_timed_prompts("0s: a dog barks | 8s: rain starts") == [TimedText(0, "a dog barks"),
                                                                        TimedText(8, "rain starts")]
    assert parse_timed_prompts("a dog barks\n0:05: rain: heavy\n1m: thunder") == [
        TimedText(0, "a dog barks"), TimedText(5, "rain: heavy"), TimedText(60, "thunder")]
    assert parse_timed_prompts("ratio 16:9 shot") == [TimedText(0, "ratio 16:9 shot")]  # a colon in the text


@pytest.mark.parametrize("text,needle", [
    ("", "empty"), ("  |  ", "empty"), ("2s: late start", "one must start at 0s"),
    ("0s: a | 8s: b | 5s: c", "increasing time"), ("0s: a | 0s: b", "increasing time"),
    ("0s: a | no time here", "has no start time"), ("0s: a | 3s:   ", "is empty"),
])
def test_parse_timed_prompts_errors_say_the_fix(text, needle):
    with pytest.raises(PromptError, match=needle):
        parse_timed_prompts(text)


def ctx(width, seed=0, length=5):
    return torch.randn(1, length, width, generator=torch.Generator().manual_seed(seed))


def test_plan_add_sorts_and_refuses_duplicates():
    p = PromptPlan().add(TimedContext(4.0, ctx(48), label="b")).add(TimedContext(0.0, ctx(48), label="a"))
    assert [i.label for i in p.items] == ["a", "b"]
    assert p.describe() == "0s: a | 4s: b"
    with pytest.raises(PromptError, match="two prompts start at 4s"):
        p.add(TimedContext(4.0, ctx(48)))
    with pytest.raises(PromptError, match="must start at 0s"):
        PromptPlan((TimedContext(1.0, ctx(48)),)).validate()


@pytest.fixture(scope="module")
def model():
    cfg = TINY.replace(connectors=ConnectorConfig(num_layers=1, heads=2, head_dim=12, num_registers=8))
    return random_model(cfg, dtype=torch.float64)


def test_processed_context_splits_into_video_and_audio(model):
    c = model.config.caption_channels
    x = ctx(2 * c).double()
    kv = context_to_text_kv(model, x)
    ref = model.text_kv(x[..., :c], x[..., c:])
    assert torch.equal(kv.video[0][0], ref.video[0][0]) and torch.equal(kv.audio[1][1], ref.audio[1][1])


def test_unprocessed_features_run_the_connectors(model):
    c = model.config.caption_channels
    x = ctx(c).double()
    kv = context_to_text_kv(model, x, unprocessed=True)
    v, a = model.encode_text(x)
    assert kv.video[0][0].shape[1] == 1024  # padded with registers
    assert torch.equal(kv.video[0][0], model.text_kv(v, a).video[0][0])


def test_bad_widths_and_batches_are_named(model):
    with pytest.raises(PromptError, match="width 6144"):
        context_to_text_kv(model, ctx(6144))
    with pytest.raises(PromptError, match="batched prompts"):
        context_to_text_kv(model, torch.zeros(2, 3, 2 * model.config.caption_channels))
    no_conn = random_model(TINY, dtype=torch.float64)
    with pytest.raises(ValueError, match="no text connectors"):
        context_to_text_kv(no_conn, ctx(TINY.caption_channels).double())


def test_padding_masks_the_extra_tokens_and_keeps_attention(model):
    c = model.config.caption_channels
    short, long_ = ctx(2 * c, 1, 3).double(), ctx(2 * c, 2, 7).double()
    a, b = pad_text_kv([context_to_text_kv(model, short), context_to_text_kv(model, long_)])
    assert a.video[0][0].shape[1] == b.video[0][0].shape[1] == 7
    assert a.mask is not None and (a.mask[..., 3:] < -1e30).all() and (a.mask[..., :3] == 0).all()
    assert (b.mask == 0).all()
    # the masked padding leaves the result unchanged
    layout = make_layout("v2")
    spec = StreamSpec.from_clip(make_clip(layout, 32, 32, seconds=1))
    v1, a1 = generate(model, spec, context_to_text_kv(model, short))
    v2, a2 = generate(model, spec, a)
    assert (v1 - v2).abs().max() < 1e-10 and (a1 - a2).abs().max() < 1e-10


def test_build_prompts_and_switch_report(model):
    c = model.config.caption_channels
    plan = PromptPlan((TimedContext(0.0, ctx(2 * c, 1).double(), label="dog"),
                       TimedContext(1.5, ctx(c, 2, 9).double(), True, label="rain")), recache=True)
    res = build_prompts(model, plan, negative=ctx(2 * c, 3, 4).double())
    assert res.schedule.recache and [s.label for s in res.schedule.segments] == ["dog", "rain"]
    lengths = {s.text.video[0][0].shape[1] for s in res.schedule.segments} | {res.negative.video[0][0].shape[1]}
    assert lengths == {1024}
    layout = make_layout("v2")
    rep = switch_report(plan, layout, num_blocks=3)
    assert [(s.block, s.effective_s) for s in rep] == [(0, 0.0), (2, 2.0)]  # 1.5 s waits for the block at 2 s
    with pytest.raises(PromptError, match="clip ends at 2s"):
        switch_report(plan, layout, num_blocks=2)
    crowded = PromptPlan((TimedContext(0.0, ctx(2 * c)), TimedContext(1.2, ctx(2 * c)), TimedContext(1.6, ctx(2 * c))))
    with pytest.raises(PromptError, match="takes over at the same block boundary"):
        switch_report(crowded, layout, num_blocks=4)
