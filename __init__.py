"""OmniForcing for ComfyUI: real-time streaming joint audio+video generation (block-causal LTX-2).

ComfyUI imports this package and calls `comfy_entrypoint()`. Nothing ComfyUI-specific is imported
at module import time, so `import` works outside ComfyUI too (tests, the core library's CLI).
"""

WEB_DIRECTORY = "./nodes/web"


async def comfy_entrypoint():
    from .nodes import OmniForcingExtension

    return OmniForcingExtension()


__all__ = ["comfy_entrypoint", "WEB_DIRECTORY"]
