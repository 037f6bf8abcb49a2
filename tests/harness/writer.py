"""Test-only: a live writer in a child process that streams until Ctrl-C, and reaping its encoder."""
from __future__ import annotations

import os
import signal
import textwrap
import time

# format with repo, out, fps, sr, w, h, nf (frames per block), na (samples per block), kwargs (LiveWriter extras)
CTRL_C_WRITER = textwrap.dedent("""
    import sys, numpy as np
    sys.path.insert(0, {repo!r})
    from omniforcing_core.live import LiveWriter
    w = LiveWriter({out!r}, {fps}, {sr}, {w}, {h}{kwargs})
    print(w._aac.proc.pid, flush=True)
    try:
        i = 0
        while True:
            t = np.arange(i * {na}, (i + 1) * {na}) / {sr}
            audio = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None].repeat(2, 0)
            w.write(np.full(({nf}, {h}, {w}, 3), (40 * i) % 256, np.uint8), audio)
            print("block", i, flush=True)
            i += 1
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        w.close()
""")


def reap(pid: int, strict: bool = True) -> None:
    """The encoder we spawned sees EOF and exits; make sure of it (by its pid) so no process leaks.
    strict: it must have gone by itself within 5 s."""
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    if strict:
        raise AssertionError(f"encoder {pid} outlived its writer")
