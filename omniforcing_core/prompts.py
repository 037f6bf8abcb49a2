"""Prompts over time: timed-text parsing, prompt plans, and LTX-2 text contexts -> per-layer text K/V.

A host (ComfyUI) hands us text contexts the way its text encoder produced them:
  * processed: already through the connectors, video and audio halves concatenated
    ([B, L, 2 * caption_channels], LTX-2.0's 7680-wide "compat" output);
  * unprocessed: aggregated Gemma features that still need our connectors ([B, L, caption_channels]).
A `PromptPlan` is a list of such contexts with start times; `build_prompts` turns it into the
sampler's `PromptSchedule` for one model. Prompts switch at block boundaries only, so a prompt
asked for at 7.5 s takes effect at the first block starting at or after 7.5 s; `switch_report` says
when each one really starts.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .layout import BlockLayout
from .sampling import PromptSchedule, PromptSegment
from .text import TextKV


class PromptError(ValueError):
    """A prompt schedule that cannot be used as given; the message says how to fix it."""


# -- timed text -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TimedText:
    start_s: float
    text: str


_TIME = re.compile(r"^\s*(?:(?P<min>\d+):(?P<sec>\d+(?:\.\d+)?)|(?:(?P<m>\d+(?:\.\d+)?)m)?\s*(?:(?P<s>\d+(?:\.\d+)?)\s*s?)?)\s*$")
EXAMPLE = "0s: a dog barks | 8s: rain starts"


def parse_time(token: str) -> float:
    """'8', '8s', '8.5s', '1m20s', '1m', '1:20', '0:08.5' -> seconds."""
    m = _TIME.match(token)
    if not token.strip() or not m or not any(m.group(g) for g in ("min", "sec", "m", "s")):
        raise PromptError(f"'{token.strip()}' is not a time; write seconds like 8s, 8.5s, 1m20s or 1:20")
    if m.group("min") is not None:
        return int(m.group("min")) * 60 + float(m.group("sec"))
    return float(m.group("m") or 0) * 60 + float(m.group("s") or 0)


def parse_timed_prompts(text: str) -> list[TimedText]:
    """Parse '0s: a dog barks | 8s: rain starts' (items separated by '|' or new lines).

    An item without a time is allowed only first (it starts at 0 s). Times must increase.
    """
    items = [p.strip() for p in re.split(r"[|\n]", text or "") if p.strip()]
    if not items:
        raise PromptError(f"the prompt schedule is empty; write at least one prompt, e.g. '{EXAMPLE}'")
    out: list[TimedText] = []
    for i, item in enumerate(items):
        head, sep, rest = item.partition(":")
        start = None
        if sep:
            # '1:20: text' -> the time holds a colon itself
            if re.fullmatch(r"\s*\d+\s*", head) and re.match(r"\s*\d+(?:\.\d+)?\s*:", rest):
                sec, _, rest = rest.partition(":")
                head = f"{head.strip()}:{sec.strip()}"
            try:
                start = parse_time(head)
            except PromptError:
                start = None  # a colon inside the prompt text itself
                rest = item
        if start is None:
            if i:
                raise PromptError(f"prompt {i + 1} ('{item[:40]}') has no start time; write it as '<time>: <prompt>', "
                                  f"e.g. '{EXAMPLE}'")
            start, rest = 0.0, item
        prompt = rest.strip()
        if not prompt:
            raise PromptError(f"prompt {i + 1} at {start:g}s is empty; write text after the colon")
        if out and start <= out[-1].start_s:
            raise PromptError(f"prompt {i + 1} starts at {start:g}s, not after the previous one "
                              f"({out[-1].start_s:g}s); list prompts in increasing time")
        out.append(TimedText(start, prompt))
    if out[0].start_s != 0:
        raise PromptError(f"the first prompt starts at {out[0].start_s:g}s; one must start at 0s "
                          f"(write '0s: <prompt>' first)")
    return out


# -- plans (host-neutral: raw contexts with start times) ------------------------------------------

@dataclass(frozen=True)
class TimedContext:
    """One prompt of a plan: a text context as the host's encoder returned it, from `start_s` on."""

    start_s: float
    context: torch.Tensor  # [B, L, D]
    unprocessed: bool = False  # True: raw features that still need the model's connectors
    label: str = ""


@dataclass(frozen=True)
class PromptPlan:
    """Prompts with start times, independent of any model (the samplers resolve it per model).

    `recache`: at a switch, re-encode the cached window under the new prompt (smoother change)."""

    items: tuple[TimedContext, ...] = ()
    recache: bool = False

    def add(self, item: TimedContext) -> "PromptPlan":
        if any(abs(i.start_s - item.start_s) < 1e-9 for i in self.items):
            raise PromptError(f"two prompts start at {item.start_s:g}s; give each prompt its own start time")
        items = tuple(sorted(self.items + (item,), key=lambda i: i.start_s))
        return PromptPlan(items, self.recache)

    def with_recache(self, recache: bool) -> "PromptPlan":
        return PromptPlan(self.items, recache)

    def validate(self) -> None:
        if not self.items:
            raise PromptError("the prompt schedule has no prompts")
        if self.items[0].start_s > 0:
            raise PromptError(f"the first prompt starts at {self.items[0].start_s:g}s; one prompt must start at 0s")
        if any(i.start_s < 0 for i in self.items):
            raise PromptError("prompt start times must be >= 0s")

    @classmethod
    def single(cls, context: torch.Tensor, unprocessed: bool = False, label: str = "") -> "PromptPlan":
        return cls((TimedContext(0.0, context, unprocessed, label),))

    def describe(self) -> str:
        return " | ".join(f"{i.start_s:g}s: {i.label or '<conditioning>'}" for i in self.items)


# -- contexts -> text K/V --------------------------------------------------------------------------

def context_to_text_kv(model, context: torch.Tensor, unprocessed: bool = False) -> TextKV:
    """An LTX-2 text context (processed 2C-wide or raw C-wide features) -> the model's text K/V."""
    c = model.config.caption_channels
    if context.dim() != 3:
        raise PromptError(f"a text context must be [batch, tokens, width], got shape {tuple(context.shape)}")
    if context.shape[0] != 1:
        raise PromptError(f"batched prompts ({context.shape[0]}) are not supported; give one prompt per "
                          f"conditioning (queue several prompts with scripts/queue_batch.py)")
    d = context.shape[-1]
    if d == 2 * c and not unprocessed:  # already through the connectors: [video | audio]
        return model.text_kv(context[..., :c], context[..., c:])
    if d == c:  # raw features: run our connectors
        v, a = model.encode_text(context)
        return model.text_kv(v, a)
    raise PromptError(f"text context width {d} does not fit this model: it takes {c} (features that still need the "
                      f"connectors) or {2 * c} (video and audio contexts); was the prompt encoded with the LTX-2.0 "
                      f"text encoder? (LTX-2.3's 6144-wide contexts are not supported)")


def pad_text_kv(texts: Sequence[TextKV]) -> list[TextKV]:
    """Bring text K/V of different token counts to one length (zero keys, masked), so they can be
    stacked for CFG or swapped mid-stream."""
    lengths = {t.video[0][0].shape[1] for t in texts}
    masked = {t.mask is not None for t in texts}
    if len(lengths) == 1 and len(masked) == 1:
        return list(texts)
    n = max(lengths)
    out = []
    for t in texts:
        k0 = t.video[0][0]
        b, length, dt, dev = k0.shape[0], k0.shape[1], k0.dtype, k0.device
        pad = n - length

        def grow(kv):
            return [(torch.nn.functional.pad(k, (0, 0, 0, pad)), torch.nn.functional.pad(v, (0, 0, 0, pad)))
                    for k, v in kv]
        mask = torch.zeros(b, 1, 1, n, dtype=dt, device=dev)
        if t.mask is not None:
            mask[..., :length] = t.mask.to(dt)
        mask[..., length:] = torch.finfo(dt).min
        out.append(TextKV(grow(t.video), grow(t.audio), mask))
    return out


@dataclass
class ResolvedPrompts:
    schedule: PromptSchedule
    negative: Optional[TextKV]


def build_prompts(model, plan: PromptPlan, negative: Optional[torch.Tensor] = None,
                  negative_unprocessed: bool = False) -> ResolvedPrompts:
    """A plan (+ optional negative context) -> the sampler's prompt schedule and negative K/V."""
    plan.validate()
    texts = [context_to_text_kv(model, i.context, i.unprocessed) for i in plan.items]
    neg = context_to_text_kv(model, negative, negative_unprocessed) if negative is not None else None
    padded = pad_text_kv(texts + ([neg] if neg is not None else []))
    segs = [PromptSegment(i.start_s, kv, i.label) for i, kv in zip(plan.items, padded)]
    return ResolvedPrompts(PromptSchedule(segs, recache=plan.recache), padded[-1] if neg is not None else None)


# -- when prompts really switch --------------------------------------------------------------------

@dataclass(frozen=True)
class Switch:
    index: int  # prompt index in the plan
    label: str
    requested_s: float
    block: int  # first block that uses it
    effective_s: float


def switch_report(plan: PromptPlan, layout: BlockLayout, num_blocks: int) -> list[Switch]:
    """When each prompt takes effect (block boundaries); errors for prompts that never would."""
    plan.validate()
    starts = [i.start_s for i in plan.items]
    first_block: dict[int, int] = {}
    for b in layout.iter_blocks(num_blocks):
        t = b.t_start
        idx = max(j for j, s in enumerate(starts) if s <= t + 1e-9) if b.index else 0
        first_block.setdefault(idx, b.index)
    end = layout.seconds_for_blocks(num_blocks)
    out = []
    for j, item in enumerate(plan.items):
        if j not in first_block:
            later = [k for k in first_block if k > j]
            why = (f"the clip ends at {end:g}s" if not later else
                   f"prompt {later[0] + 1} at {plan.items[later[0]].start_s:g}s takes over at the same block boundary")
            raise PromptError(f"prompt {j + 1} ('{item.label or '<conditioning>'}') at {item.start_s:g}s is never used: "
                              f"{why}; prompts switch at block boundaries "
                              f"(every {layout.video_per_block / layout.time.video.latent_rate:g}s)")
        blk = layout.block(first_block[j])
        out.append(Switch(j, item.label, item.start_s, blk.index, blk.t_start))
    return out


__all__ = ["PromptError", "TimedText", "parse_time", "parse_timed_prompts", "TimedContext", "PromptPlan",
           "context_to_text_kv", "pad_text_kv", "ResolvedPrompts", "build_prompts", "Switch", "switch_report"]
