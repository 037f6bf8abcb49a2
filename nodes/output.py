"""Where nodes write files: numbered names inside ComfyUI's output folder."""
from __future__ import annotations

import os


def output_paths(prefix: str, width: int, height: int) -> tuple[str, str, str]:
    """(folder, base name, subfolder) inside ComfyUI's output folder; refuses prefixes that escape it."""
    import folder_paths

    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height)
    return folder, f"{filename}_{counter:05}_", subfolder.replace(os.sep, "/")


__all__ = ["output_paths"]
