"""Timed prompts: parsing, plans, host text contexts -> text K/V, and when switches really happen."""
import pytest
import torch

from omniforcing_core.config import ConnectorConfig, TINY
from omniforcing_core.embedded import random_model
from omniforcing_core.layout import make_clip, make_layout
from omniforcing_core.prompts import (Prompt, PromptError, PromptTimeline, TextContext, context_to_text_kv,
                                      pad_text_kv, parse_time, parse_timed_prompts, resolve_prompts)
from omniforcing_core.sampling import generate


@pytest.mark.parametrize("token,seconds", [("8", 8), ("8s", 8), ("8.5s", 8.5), ("1m20s", 80), ("1m", 60),
                                           ("1:20", 80), ("0:08.5", 8.5), (" 3 s ", 3)])
def test_parse_time(token, seconds):
    assert parse_time(token) == pytest.approx(seconds)


@pytest.mark.parametrize("token", ["", "abc", "8x", "-1s", "1:xx"])
def test_parse_time_rejects(token):
    with pytest.raises(PromptError, match="not a time"):
        parse_time(token)


def timed(text):
    return [(p.start_s, p.value) for p in parse_timed_prompts(text).prompts]


def test_parse_timed_prompts_pipes_and_lines():
    assert timed("0s: a dog barks | 8s: rain starts") == [(0, "a dog barks"), (8, "rain starts")]
    assert timed("a dog barks\n0:05: rain: heavy\n1m: thunder") == [(0, "a dog barks"), (5, "rain: heavy"),
                                                                     (60, "thunder")]
    assert timed("ratio 16:9 shot") == [(0, "ratio 16:9 shot")]  # a colon in the text


def test_time_parsing_is_linear_in_spaces():
    """A long run of spaces (pasted text) must not make the time pattern backtrack quadratically."""
    import time
    t0 = time.perf_counter()
    with pytest.raises(PromptError):
        parse_time("1m" + " " * 20000 + "x")
    parse_timed_prompts("0s: a" + " " * 20000 + "| 8s: b")
    assert time.perf_counter() - t0 < 2.0  # quadratic backtracking took ~3 s here at 20k spaces


@pytest.mark.parametrize("text,needle", [
    ("", "empty"), ("  |  ", "empty"), ("2s: late start", "must start at 0s"),
    ("0s: a | 8s: b | 5s: c", "increasing time"), ("0s: a | 0s: b", "increasing time"),
    ("0s: a | no time here", "has no start time"), ("0s: a | 3s:   ", "is empty"),
])
def test_parse_timed_prompts_errors_say_the_fix(text, needle):
    with pytest.raises(PromptError, match=needle):
        parse_timed_prompts(text)


def ctx(width, seed=0, length=5):
    return torch.randn(1, length, width, generator=torch.Generator().manual_seed(seed))


def test_timeline_add_sorts_and_refuses_duplicates():
    p = PromptTimeline().add(Prompt(4.0, ctx(48), "b")).add(Prompt(0.0, ctx(48), "a"))
    assert [i.label for i in p.prompts] == ["a", "b"]
    assert p.describe() == "0s: a | 4s: b"
    with pytest.raises(PromptError, match="two prompts start at 4s"):
        p.add(Prompt(4.0, ctx(48)))
    with pytest.raises(PromptError, match="must start at 0s"):
        PromptTimeline((Prompt(1.0, ctx(48)),)).validate()
    with pytest.raises(PromptError, match="0s or later"):
        PromptTimeline((Prompt(0.0, 1), Prompt(float("nan"), 2))).validate()


@pytest.fixture(scope="module")
def model():
    cfg = TINY.replace(connectors=ConnectorConfig(num_layers=1, heads=2, head_dim=12, num_registers=8))
    return random_model(cfg, dtype=torch.float64)


def test_processed_context_splits_into_video_and_audio(model):
    c = model.config.caption_channels
    x = ctx(2 * c).double()
    kv = context_to_text_kv(model, TextContext(x))
    ref = model.text_kv(x[..., :c], x[..., c:])
    assert torch.equal(kv.video[0][0], ref.video[0][0]) and torch.equal(kv.audio[1][1], ref.audio[1][1])


def test_unprocessed_features_run_the_connectors(model):
    c = model.config.caption_channels
    x = ctx(c).double()
    kv = context_to_text_kv(model, TextContext(x, unprocessed=True))
    v, a = model.encode_text(x)
    assert kv.video[0][0].shape[1] == 1024  # padded with registers
    assert torch.equal(kv.video[0][0], model.text_kv(v, a).video[0][0])


def test_bad_widths_and_batches_are_named(model):
    with pytest.raises(PromptError, match="width 6144"):
        context_to_text_kv(model, TextContext(ctx(6144)))
    with pytest.raises(PromptError, match="batched prompts"):
        context_to_text_kv(model, TextContext(torch.zeros(2, 3, 2 * model.config.caption_channels)))
    no_conn = random_model(TINY, dtype=torch.float64)
    with pytest.raises(ValueError, match="no text connectors"):
        context_to_text_kv(no_conn, TextContext(ctx(TINY.caption_channels).double()))


def test_padding_masks_the_extra_tokens_and_keeps_attention(model):
    c = model.config.caption_channels
    short, long_ = ctx(2 * c, 1, 3).double(), ctx(2 * c, 2, 7).double()
    a, b = pad_text_kv([context_to_text_kv(model, TextContext(short)), context_to_text_kv(model, TextContext(long_))])
    assert a.video[0][0].shape[1] == b.video[0][0].shape[1] == 7
    assert a.mask is not None and (a.mask[..., 3:] < -1e30).all() and (a.mask[..., :3] == 0).all()
    assert (b.mask == 0).all()
    # the masked padding leaves the result unchanged
    layout = make_layout("v2")
    spec = make_clip(layout, 32, 32, seconds=1)
    v1, a1 = generate(model, spec, context_to_text_kv(model, TextContext(short)))
    v2, a2 = generate(model, spec, a)
    assert (v1 - v2).abs().max() < 1e-10 and (a1 - a2).abs().max() < 1e-10


def test_resolve_prompts_and_switches(model):
    c = model.config.caption_channels
    plan = PromptTimeline((Prompt(0.0, TextContext(ctx(2 * c, 1).double()), "dog"),
                           Prompt(1.5, TextContext(ctx(c, 2, 9).double(), True), "rain")), recache=True)
    prompts, negative = resolve_prompts(model, plan, negative=TextContext(ctx(2 * c, 3, 4).double()))
    assert prompts.recache and [p.label for p in prompts.prompts] == ["dog", "rain"]
    lengths = {p.value.video[0][0].shape[1] for p in prompts.prompts} | {negative.video[0][0].shape[1]}
    assert lengths == {1024}
    layout = make_layout("v2")
    rep = plan.switches(layout, num_blocks=3)
    assert [(s.block, s.effective_s) for s in rep] == [(0, 0.0), (2, 2.0)]  # 1.5 s waits for the block at 2 s
    assert [plan.index_for(b) for b in layout.iter_blocks(3)] == [0, 0, 1]  # the sampler's rule, the same one
    with pytest.raises(PromptError, match="clip ends at 2s"):
        plan.switches(layout, num_blocks=2)
    crowded = PromptTimeline(tuple(Prompt(t, TextContext(ctx(2 * c))) for t in (0.0, 1.2, 1.6)))
    with pytest.raises(PromptError, match="takes over at the same block boundary"):
        crowded.switches(layout, num_blocks=4)
