"""Where nodes write files: numbered names inside ComfyUI's output folder."""
from __future__ import annotations

import os


def output_paths(prefix: str, width: int, height: int) -> tuple[str, str, str]:
    """(folder, base name, subfolder) inside ComfyUI's output folder; refuses prefixes that escape it
    and names no file system can hold."""
    import folder_paths

    bad = sorted({repr(c) for c in prefix if ord(c) < 32 or c == "\x7f"})
    if bad:
        raise ValueError(f"filename_prefix {prefix!r} holds control characters ({', '.join(bad)}); use letters, "
                         f"digits, '-', '_' and '/' for subfolders, e.g. 'omniforcing/stream'")
    if not prefix.strip():
        raise ValueError("filename_prefix is empty; give a name such as 'omniforcing/stream'")
    folder, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix, folder_paths.get_output_directory(), width, height)
    return folder, f"{filename}_{counter:05}_", subfolder.replace(os.sep, "/")


__all__ = ["output_paths"]
