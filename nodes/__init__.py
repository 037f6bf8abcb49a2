"""ComfyUI nodes for OmniForcing: thin V3 adapters from ComfyUI types to `omniforcing_core`.

Imported by the pack's `comfy_entrypoint()` only, inside ComfyUI; always relative (ComfyUI has its
own top-level `nodes` module).
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .conditioning import OmniForcingPromptAt, OmniForcingPromptSchedule
from .loader import OmniForcingFromNativeModel, OmniForcingModelLoader, register_model_folder
from .mux import OmniForcingMux
from .sampler import OmniForcingSampler
from .stream import OmniForcingStream
from .toy import OmniForcingToyDecode, OmniForcingToyModel, OmniForcingToyTextEncode, OmniForcingToyWorldClip

NODES = [OmniForcingModelLoader, OmniForcingFromNativeModel, OmniForcingPromptAt, OmniForcingPromptSchedule,
         OmniForcingSampler, OmniForcingStream, OmniForcingMux, OmniForcingToyModel, OmniForcingToyTextEncode,
         OmniForcingToyDecode, OmniForcingToyWorldClip]


class OmniForcingExtension(ComfyExtension):
    async def on_load(self) -> None:
        register_model_folder()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


__all__ = ["OmniForcingExtension", "NODES"]
