"""Prompts over time: one `PromptTimeline` from timed text or a host's conditioning to the sampler.

A host (ComfyUI) hands us text contexts the way its text encoder produced them (`TextContext`):
  * processed: already through the connectors, video and audio halves concatenated
    ([B, L, 2 * caption_channels], LTX-2.0's 7680-wide "compat" output);
  * unprocessed: aggregated Gemma features that still need our connectors ([B, L, caption_channels]).
A `PromptTimeline` holds prompts with start times; `resolve_prompts` maps its contexts to the
model's per-layer text K/V (the same timeline type, other values). Prompts switch at block
boundaries only: block k uses the last prompt starting at or before its start (`index_for`), so a
prompt asked for at 7.5 s takes effect at 8 s; `switches` says when each one really starts.
"""
from __future__ import annotations

import re
import math
from dataclasses import dataclass, replace
from typing import Callable, Generic, Optional, Sequence, TypeVar

import torch

from .layout import Block, BlockLayout
from .text import TextKV

T = TypeVar("T")
U = TypeVar("U")


class PromptError(ValueError):
    """A prompt schedule that cannot be used as given; the message says how to fix it."""


# -- timed text -----------------------------------------------------------------------------------

# matched after removing whitespace, so no pattern backtracks over runs of spaces (linear time)
_TIME = re.compile(r"(?:(?P<min>\d+):(?P<sec>\d+(?:\.\d+)?)|(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s?)?)")
EXAMPLE = "0s: a dog barks | 8s: rain starts"


def parse_time(token: str) -> float:
    """'8', '8s', '8.5s', '1m20s', '1m', '1:20', '0:08.5' -> seconds."""
    m = _TIME.fullmatch("".join(token.split()))
    if not token.strip() or not m or not any(m.group(g) for g in ("min", "sec", "m", "s")):
        raise PromptError(f"'{token.strip()}' is not a time; write seconds like 8s, 8.5s, 1m20s or 1:20")
    if m.group("min") is not None:
        return int(m.group("min")) * 60 + float(m.group("sec"))
    return float(m.group("m") or 0) * 60 + float(m.group("s") or 0)


def parse_timed_prompts(text: str) -> "PromptTimeline[str]":
    """Parse '0s: a dog barks | 8s: rain starts' (items separated by '|' or new lines) into a
    timeline of prompt texts. An item without a time is allowed only first (it starts at 0 s).
    Times must increase in the text."""
    items = [p.strip() for p in re.split(r"[|\n]", text or "") if p.strip()]
    if not items:
        raise PromptError(f"the prompt schedule is empty; write at least one prompt, e.g. '{EXAMPLE}'")
    out: list[Prompt[str]] = []
    for i, item in enumerate(items):
        head, sep, rest = item.partition(":")
        start = None
        if sep:
            # '1:20: text' -> the time holds a colon itself
            if head.strip().isdigit() and re.match(r"\s*\d+(?:\.\d+)?\s*:", rest):
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
        out.append(Prompt(start, prompt, prompt))
    timeline = PromptTimeline(tuple(out))
    timeline.validate()
    return timeline


# -- the timeline ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextContext:
    """One prompt as the host's text encoder returned it."""

    tensor: torch.Tensor  # [1, L, D]
    unprocessed: bool = False  # True: raw features that still need the model's connectors


@dataclass(frozen=True)
class Prompt(Generic[T]):
    start_s: float
    value: T  # a TextContext before `resolve_prompts`, the model's TextKV after
    label: str = ""


@dataclass(frozen=True)
class PromptTimeline(Generic[T]):
    """Prompts with start times (kept sorted). `recache`: at a switch, re-encode the cached window
    under the new prompt (a smoother change)."""

    prompts: tuple[Prompt[T], ...] = ()
    recache: bool = False

    def __post_init__(self):
        object.__setattr__(self, "prompts", tuple(sorted(self.prompts, key=lambda p: p.start_s)))

    @classmethod
    def single(cls, value: T, label: str = "") -> "PromptTimeline[T]":
        return cls((Prompt(0.0, value, label),))

    def add(self, prompt: Prompt[T]) -> "PromptTimeline[T]":
        out = replace(self, prompts=self.prompts + (prompt,))
        out._check_distinct()  # fail at the node that adds a clash, not later
        return out

    def with_recache(self, recache: bool) -> "PromptTimeline[T]":
        return replace(self, recache=bool(recache))

    def map(self, fn: Callable[[T], U]) -> "PromptTimeline[U]":
        return PromptTimeline(tuple(Prompt(p.start_s, fn(p.value), p.label) for p in self.prompts), self.recache)

    def validate(self) -> None:
        """The one check of a timeline: prompts exist, times are finite, distinct and one starts at 0."""
        if not self.prompts:
            raise PromptError(f"the prompt schedule has no prompts; give at least one, e.g. '{EXAMPLE}'")
        for p in self.prompts:
            if not math.isfinite(p.start_s) or p.start_s < 0:
                raise PromptError(f"prompt '{p.label or '<conditioning>'}' starts at {p.start_s:g}s; start times "
                                  f"must be 0s or later")
        self._check_distinct()
        if self.prompts[0].start_s > 1e-9:
            raise PromptError(f"the first prompt starts at {self.prompts[0].start_s:g}s; one prompt must start "
                              f"at 0s (write '0s: <prompt>' first)")

    def _check_distinct(self) -> None:
        for a, b in zip(self.prompts, self.prompts[1:]):
            if b.start_s - a.start_s < 1e-9:
                raise PromptError(f"two prompts start at {a.start_s:g}s; give each prompt its own start time")

    def index_for(self, block: Block) -> int:
        """The switch rule: a block uses the last prompt starting at or before the block's start."""
        i = 0
        for j, p in enumerate(self.prompts):
            if p.start_s <= block.t_start + 1e-9:
                i = j
        return i

    def switches(self, layout: BlockLayout, num_blocks: int) -> list["Switch"]:
        """When each prompt takes effect; an error for a prompt that never would."""
        self.validate()
        first_block: dict[int, int] = {}
        for b in layout.iter_blocks(num_blocks):
            first_block.setdefault(self.index_for(b), b.index)
        out = []
        for j, p in enumerate(self.prompts):
            if j not in first_block:
                later = [k for k in first_block if k > j]
                why = (f"the clip ends at {layout.seconds_for_blocks(num_blocks):g}s" if not later else
                       f"prompt {later[0] + 1} at {self.prompts[later[0]].start_s:g}s takes over at the same "
                       f"block boundary")
                step = layout.video_per_block / layout.time.video.latent_rate
                raise PromptError(f"prompt {j + 1} ('{p.label or '<conditioning>'}') at {p.start_s:g}s is never "
                                  f"used: {why}; prompts switch at block boundaries (every {step:g}s)")
            blk = layout.block(first_block[j])
            out.append(Switch(j, p.label, p.start_s, blk.index, blk.t_start))
        return out

    def describe(self) -> str:
        return " | ".join(f"{p.start_s:g}s: {p.label or '<conditioning>'}" for p in self.prompts)


@dataclass(frozen=True)
class Switch:
    index: int  # prompt index in the timeline
    label: str
    requested_s: float
    block: int  # first block that uses it
    effective_s: float


# -- contexts -> text K/V --------------------------------------------------------------------------

def context_to_text_kv(model, context: TextContext, runtime=None) -> TextKV:
    """An LTX-2 text context (processed 2C-wide or raw C-wide features) -> the model's text K/V."""
    c = model.config.caption_channels
    context, unprocessed = context.tensor, context.unprocessed
    rt = {} if runtime is None else {"runtime": runtime}
    if context.dim() != 3:
        raise PromptError(f"a text context must be [batch, tokens, width], got shape {tuple(context.shape)}")
    if context.shape[0] != 1:
        raise PromptError(f"batched prompts ({context.shape[0]}) are not supported; give one prompt per "
                          f"conditioning (queue several prompts with scripts/queue_batch.py)")
    d = context.shape[-1]
    if d == 2 * c and not unprocessed:  # already through the connectors: [video | audio]
        return model.text_kv(context[..., :c], context[..., c:], **rt)
    if d == c:  # raw features: run our connectors
        v, a = model.encode_text(context, **rt)
        return model.text_kv(v, a, **rt)
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


def resolve_prompts(model, timeline: PromptTimeline[TextContext], negative: Optional[TextContext] = None,
                    runtime=None) -> tuple[PromptTimeline[TextKV], Optional[TextKV]]:
    """A timeline of host contexts (+ optional negative) -> the same timeline of the model's text K/V,
    all padded to one token count (so they stack for CFG and swap mid-stream), and the negative's K/V."""
    timeline.validate()
    texts = [context_to_text_kv(model, p.value, runtime) for p in timeline.prompts]
    neg = [context_to_text_kv(model, negative, runtime)] if negative is not None else []
    padded = pad_text_kv(texts + neg)
    it = iter(padded)
    return timeline.map(lambda _: next(it)), (padded[-1] if neg else None)


__all__ = ["PromptError", "parse_time", "parse_timed_prompts", "TextContext", "Prompt",
           "PromptTimeline", "Switch", "context_to_text_kv", "pad_text_kv", "resolve_prompts"]
