"""A synthetic audio-visual world with exactly known A/V events (no downloads, fully deterministic).

Each clip: one or two objects on a dark background, 24 fps. A "bouncing" object falls under
gravity and bounces on the floor; a "sliding" object moves sideways and bounces off the walls.
Every contact emits a short decaying tone whose pitch is set by the object's colour (timbre by
its shape: a ball is a pure tone, a square adds odd harmonics). The caption says what happens
("a red ball bounces twice, a blue square slides"). Contact times are solved on a fine time grid
(1/4800 s, interpolated inside the step), so A/V synchrony of generated clips can be measured against exact ground truth.

Lengths follow LTX-2's causal codecs: `1 + 24 s` pixel frames, `1 + 100 s` mel frames
(16 kHz, hop 160), i.e. `160 * 100 s` waveform samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

FPS = 24
SAMPLE_RATE = 16000
HOP = 160
COLOURS = {  # name -> (rgb, tone pitch in Hz)
    "red": ((0.95, 0.15, 0.1), 350.0),
    "green": ((0.15, 0.9, 0.2), 600.0),
    "blue": ((0.2, 0.35, 1.0), 1400.0),
    "yellow": ((0.95, 0.9, 0.1), 2400.0),
}
SHAPES = ("ball", "square")
MOTIONS = ("bounces", "slides")
COUNT_WORDS = {0: "never", 1: "once", 2: "twice", 3: "three times", 4: "four times", 5: "five times"}
TONE_S = 0.12  # tone length
TONE_DECAY_S = 0.035
BACKGROUND = (0.05, 0.05, 0.08)


@dataclass(frozen=True)
class Event:
    time: float  # seconds, exact
    obj: int  # object index
    colour: str
    kind: str  # "floor" | "wall"


@dataclass
class ObjectSpec:
    colour: str
    shape: str
    motion: str
    radius: float  # fraction of the frame width
    x0: float
    y0: float
    vx: float  # frame widths per second
    vy: float


@dataclass
class Clip:
    video: torch.Tensor  # [3, F, H, W] in [0, 1]
    audio: torch.Tensor  # [N] waveform at 16 kHz in [-1, 1]
    events: list[Event]
    caption: str
    objects: list[ObjectSpec] = field(default_factory=list)
    seconds: float = 0.0


def num_frames(seconds: float) -> int:
    return 1 + int(round(FPS * seconds))


def num_samples(seconds: float) -> int:
    return int(round(SAMPLE_RATE * seconds))


def _simulate(o: ObjectSpec, seconds: float, dt: float = 1 / 4800):
    """Positions on a fine grid and exact-ish contact times (interpolated inside one substep)."""
    n = int(round(seconds / dt)) + 1
    x, y, vx, vy = o.x0, o.y0, o.vx, o.vy
    g = 3.2 if o.motion == "bounces" else 0.0
    xs, ys, events = [], [], []
    r = o.radius
    for i in range(n):
        xs.append(x)
        ys.append(y)
        t = i * dt
        vy_n = vy + g * dt
        x_n, y_n = x + vx * dt, y + vy_n * dt
        if y_n > 1 - r and vy_n > 0:  # floor
            frac = (1 - r - y) / max(y_n - y, 1e-12)
            events.append((t + frac * dt, "floor"))
            y_n, vy_n = 2 * (1 - r) - y_n, -vy_n
        if o.motion == "slides" and (x_n > 1 - r or x_n < r):
            edge = 1 - r if x_n > 1 - r else r
            frac = (edge - x) / (x_n - x) if x_n != x else 0.0
            events.append((t + frac * dt, "wall"))
            x_n, vx = 2 * edge - x_n, -vx
        x, y, vy = x_n, y_n, vy_n
    return torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64), events, dt


def _render(objs: list[ObjectSpec], tracks, seconds: float, size: int) -> torch.Tensor:
    f = num_frames(seconds)
    img = torch.tensor(BACKGROUND).view(3, 1, 1, 1).expand(3, f, size, size).clone()
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = coords.view(1, size, 1), coords.view(1, 1, size)
    for o, (xs, ys, _, dt) in zip(objs, tracks):
        idx = torch.clamp((torch.arange(f, dtype=torch.float64) / FPS / dt).round().long(), max=len(xs) - 1)
        cx, cy = xs[idx].float().view(f, 1, 1), ys[idx].float().view(f, 1, 1)
        soft = 1.5 / size
        if o.shape == "ball":
            d = torch.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) - o.radius
        else:
            d = torch.maximum((xx - cx).abs(), (yy - cy).abs()) - o.radius * 0.9
        alpha = torch.clamp(0.5 - d / soft, 0, 1)  # [F, H, W]
        rgb = torch.tensor(COLOURS[o.colour][0]).view(3, 1, 1, 1)
        img = img * (1 - alpha[None]) + rgb * alpha[None]
    return img.clamp(0, 1)


def tone(colour: str, shape: str, n: int, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    t = torch.arange(n, dtype=torch.float64) / sample_rate
    f0 = COLOURS[colour][1]
    wave = torch.sin(2 * math.pi * f0 * t)
    if shape == "square":
        wave = wave + 0.4 * torch.sin(2 * math.pi * 3 * f0 * t)
    env = torch.exp(-t / TONE_DECAY_S) * torch.clamp(t / 0.002, max=1.0)
    return (0.45 * wave * env).float()


def _synth(objs: list[ObjectSpec], events: list[Event], seconds: float) -> torch.Tensor:
    n = num_samples(seconds)
    out = torch.zeros(n)
    m = int(TONE_S * SAMPLE_RATE)
    for e in events:
        s = int(round(e.time * SAMPLE_RATE))
        if s >= n:
            continue
        w = tone(e.colour, objs[e.obj].shape, m)
        k = min(m, n - s)
        out[s:s + k] += w[:k]
    return out.clamp(-1, 1)


def caption_for(objs: list[ObjectSpec], events: list[Event]) -> str:
    parts = []
    for i, o in enumerate(objs):
        cnt = sum(1 for e in events if e.obj == i)
        if o.motion == "bounces":
            parts.append(f"a {o.colour} {o.shape} bounces {COUNT_WORDS.get(cnt, 'many times')}")
        else:
            parts.append(f"a {o.colour} {o.shape} slides" + (f" and hits the wall {COUNT_WORDS.get(cnt, 'many times')}"
                                                              if cnt else ""))
    return ", ".join(parts)


def sample_objects(g: torch.Generator, max_objects: int = 2) -> list[ObjectSpec]:
    u = lambda a, b: a + (b - a) * float(torch.rand((), generator=g))  # noqa: E731
    n = 1 + int(torch.randint(max_objects, (), generator=g))
    colours = torch.randperm(len(COLOURS), generator=g)[:n].tolist()
    objs = []
    for c in colours:
        shape = SHAPES[int(torch.randint(2, (), generator=g))]
        motion = MOTIONS[int(torch.randint(2, (), generator=g))]
        r = u(0.08, 0.12)
        if motion == "bounces":
            objs.append(ObjectSpec(list(COLOURS)[c], shape, motion, r, u(0.2, 0.8), u(0.15, 0.6), 0.0, u(-0.3, 0.5)))
        else:
            objs.append(ObjectSpec(list(COLOURS)[c], shape, motion, r, u(0.2, 0.8), u(0.3, 0.85),
                                   u(0.7, 1.3) * (1 if torch.rand((), generator=g) < 0.5 else -1), 0.0))
    return objs


def make_clip(seed: int, seconds: float = 2.0, size: int = 128, max_objects: int = 2) -> Clip:
    """One deterministic clip for a seed."""
    g = torch.Generator().manual_seed(int(seed))
    objs = sample_objects(g, max_objects)
    tracks = [_simulate(o, seconds) for o in objs]
    events = sorted((Event(t, i, o.colour, k) for i, (o, tr) in enumerate(zip(objs, tracks)) for t, k in tr[2]
                     if t < seconds), key=lambda e: e.time)
    video = _render(objs, tracks, seconds, size)
    audio = _synth(objs, events, seconds)
    return Clip(video, audio, events, caption_for(objs, events), objs, seconds)


def vocabulary() -> list[str]:
    words = {"a", "and", "hits", "the", "wall", "many", "times", ","}
    words |= set(COLOURS) | set(SHAPES) | set(MOTIONS)
    for w in COUNT_WORDS.values():
        words |= set(w.split())
    return sorted(words)


__all__ = ["FPS", "SAMPLE_RATE", "HOP", "COLOURS", "Event", "ObjectSpec", "Clip", "make_clip", "num_frames",
           "num_samples", "caption_for", "vocabulary", "tone"]
