"""Prompt nodes: native CONDITIONING and timed text -> an OmniForcing prompt schedule.

The schedule keeps the text contexts exactly as ComfyUI's LTX-2 text encoder produced them; the
samplers turn them into per-layer text K/V for the model they run (processed 7680-wide contexts
are split, unprocessed 3840-wide features go through the model's connectors).
"""
from __future__ import annotations

from comfy_api.latest import io

from ..omniforcing_core.prompts import Prompt, PromptError, PromptTimeline, TextContext, parse_timed_prompts
from .common import CATEGORY, Prompts, log

UNPROCESSED_KEY = "unprocessed_ltxav_embeds"  # set by ComfyUI's LTX-2 text encoder when connectors still have to run


def context_from_conditioning(cond, what: str = "conditioning") -> TextContext:
    """Native CONDITIONING ([[tensor, dict], ...]) -> the text context ([1, L, D] + unprocessed flag)."""
    if not isinstance(cond, (list, tuple)) or not cond or not isinstance(cond[0], (list, tuple)):
        raise ValueError(f"'{what}' is not a CONDITIONING (connect a CLIP Text Encode output)")
    if len(cond) > 1:
        log.warning("%s holds %d entries (combined prompts); OmniForcing uses the first. Use a prompt schedule "
                    "to change prompts over time.", what, len(cond))
    tensor, extra = cond[0][0], (cond[0][1] or {})
    fps = extra.get("frame_rate")
    if fps is not None and abs(float(fps) - 24.0) > 1e-6:
        log.warning("%s carries frame_rate=%s; OmniForcing runs at 24 fps and ignores it", what, fps)
    return TextContext(tensor[:1] if tensor.dim() == 3 else tensor, bool(extra.get(UNPROCESSED_KEY, False)))


def plan_from_input(positive) -> PromptTimeline:
    """The samplers' `positive`: a CONDITIONING or our prompt schedule."""
    if isinstance(positive, PromptTimeline):
        return positive
    return PromptTimeline.single(context_from_conditioning(positive, "positive"))


def _start_input(default: float = 0.0):
    return io.Float.Input("start_seconds", default=default, min=0.0, max=3600.0, step=1.0,
                          tooltip="When this prompt takes over (seconds). Prompts switch at block boundaries "
                                  "(every second), so 7.5 s takes effect at 8 s. The first prompt must start at 0.")


def _append_input():
    return Prompts.Input("schedule", optional=True,
                         tooltip="An earlier schedule to add to (chain several of these nodes).")


class OmniForcingPromptAt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniForcingPromptAt",
            display_name="OmniForcing Prompt At Time",
            category=CATEGORY,
            description="Adds a CONDITIONING to a prompt schedule from a start time. Chain several to change the "
                        "prompt during a stream.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="A prompt encoded with ComfyUI's LTX-2 text encoder "
                                                              "(CLIP Text Encode on an LTXAV text encoder)."),
                _start_input(),
                io.Boolean.Input("recache", default=False,
                                 tooltip="At a switch, re-encode the cached history under the new prompt "
                                         "(smoother change, costs one pass per cached block). The last node in "
                                         "the chain decides."),
                _append_input(),
            ],
            outputs=[Prompts.Output(display_name="schedule")],
        )

    @classmethod
    def execute(cls, conditioning, start_seconds, recache, schedule=None) -> io.NodeOutput:
        plan = schedule if isinstance(schedule, PromptTimeline) else PromptTimeline()
        plan = plan.add(Prompt(float(start_seconds), context_from_conditioning(conditioning),
                               f"prompt @{start_seconds:g}s"))
        return io.NodeOutput(plan.with_recache(recache))


class OmniForcingPromptSchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniForcingPromptSchedule",
            display_name="OmniForcing Prompt Schedule (text)",
            category=CATEGORY,
            description="Encodes timed prompts such as '0s: a dog barks | 8s: rain starts' with the LTX-2 text "
                        "encoder into a prompt schedule.",
            inputs=[
                io.Clip.Input("clip", tooltip="The LTX-2 text encoder (LTXAV Text Encoder Loader)."),
                io.String.Input("text", multiline=True, default="0s: a dog barks in a garden | 8s: rain starts",
                                tooltip="Prompts with start times, separated by '|' or new lines: "
                                        "'0s: first | 8s: second'. Times: 8, 8s, 8.5s, 1m20s or 1:20. The first "
                                        "prompt starts at 0 (its time may be left out)."),
                io.Boolean.Input("recache", default=False,
                                 tooltip="At a switch, re-encode the cached history under the new prompt "
                                         "(smoother change, costs one pass per cached block)."),
                _append_input(),
            ],
            outputs=[Prompts.Output(display_name="schedule")],
        )

    @classmethod
    def validate_inputs(cls, text=None):
        if isinstance(text, str):  # a linked text is checked at run time
            try:
                parse_timed_prompts(text)
            except PromptError as e:
                return str(e)
        return True

    @classmethod
    def execute(cls, clip, text, recache, schedule=None) -> io.NodeOutput:
        if clip is None:
            raise ValueError("'clip' is empty: connect the LTX-2 text encoder (LTXAV Text Encoder Loader)")
        plan = schedule if isinstance(schedule, PromptTimeline) else PromptTimeline()
        for item in parse_timed_prompts(text).prompts:
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(item.value))
            plan = plan.add(Prompt(item.start_s, context_from_conditioning(cond, f"the encoding of '{item.value[:30]}'"),
                                   item.label))
        return io.NodeOutput(plan.with_recache(recache))
