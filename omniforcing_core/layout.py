"""Time base and block layouts: the one place that knows how latents map to seconds.

LTX-2 codecs compress time causally: the first latent holds one pixel (or mel) frame alone and
every later latent holds `stride` frames. Video: 24 fps, 8x in time -> 3 latents/s. Audio: 100 mel
frames/s, 4x in time -> 25 latents/s. A block layout groups latents into blocks that each cover
whole seconds of both streams; every other module asks this one for indices and times.
"""
from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass
from typing import Iterator, Optional


class LayoutError(ValueError):
    """An impossible size or length; the message names the nearest valid value."""


@dataclass(frozen=True)
class CodecTime:
    """A causal temporal codec: latent 0 holds 1 frame, every later latent holds `stride` frames."""

    frame_rate: float  # decoded frames per second (pixel frames or mel frames)
    stride: int  # frames per latent after the first

    @property
    def latent_rate(self) -> float:
        return self.frame_rate / self.stride

    def frames_for_latents(self, n_latents: int) -> int:
        """Decoded frames of `n_latents` latents (1 + stride * (n - 1))."""
        return 0 if n_latents <= 0 else 1 + self.stride * (n_latents - 1)

    def latent_bounds_frames(self, latent: int) -> tuple[int, int]:
        """Frames [start, end) held by one latent, as LTX-2 RoPE bounds them: max(0, s*l - s + 1), s*l + 1."""
        return max(0, self.stride * latent - self.stride + 1), self.stride * latent + 1

    def latent_time(self, latent: int) -> float:
        """Physical time (s) of a latent: the middle of its RoPE bounds."""
        s, e = self.latent_bounds_frames(latent)
        return (s + e) / 2.0 / self.frame_rate

    def latent_of_frame(self, frame: int) -> int:
        """The latent holding decoded frame `frame` (inverse of `latent_bounds_frames`)."""
        return 0 if frame <= 0 else (frame - 1) // self.stride + 1


@dataclass(frozen=True)
class TimeBase:
    """LTX-2's clocks: pixel video, mel audio, the vocoder's output rate and the spatial grid."""

    fps: float = 24.0
    video_stride: int = 8
    spatial_stride: int = 32
    mel_rate: float = 100.0  # 16 kHz / hop 160
    audio_stride: int = 4
    audio_sample_rate: int = 24000  # vocoder output (LTX-2.0); 2.3 uses 48 kHz
    latent_channels: int = 128
    audio_channels: int = 8
    audio_mel_bins: int = 16

    @property
    def video(self) -> CodecTime:
        return CodecTime(self.fps, self.video_stride)

    @property
    def audio(self) -> CodecTime:
        return CodecTime(self.mel_rate, self.audio_stride)

    @property
    def samples_per_mel_frame(self) -> int:
        return int(round(self.audio_sample_rate / self.mel_rate))

    @property
    def samples_per_video_frame(self) -> Fraction:
        """Audio samples per pixel frame, exactly (24 kHz / 24 fps = 1000)."""
        return Fraction(self.audio_sample_rate) / Fraction(self.fps).limit_denominator(1001)

    def sample_at_frame(self, frame: int) -> int:
        """The audio sample where video frame `frame` starts: round(frame * sample_rate / fps), exactly."""
        return int(frame * self.samples_per_video_frame + Fraction(1, 2))

    def video_latents_per_second(self) -> int:
        return _whole(self.fps / self.video_stride, "video latents per second")

    def audio_latents_per_second(self) -> int:
        return _whole(self.mel_rate / self.audio_stride, "audio latents per second")

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """(H/32, W/32) with a clear error naming the nearest valid size."""
        s = self.spatial_stride
        bad = [f"{name}={v} is not a positive multiple of {s}; nearest valid {name} is {max(s, int(round(v / s)) * s)}"
               for name, v in (("width", width), ("height", height)) if v <= 0 or v % s]
        if bad:  # every bad dimension at once
            raise LayoutError("; ".join(bad))
        return height // s, width // s


def _whole(x: float, what: str) -> int:
    if abs(x - round(x)) > 1e-9:
        raise LayoutError(f"{what} = {x} is not a whole number; blocks cannot cover whole seconds")
    return int(round(x))


DEFAULT_TIME = TimeBase()


@dataclass(frozen=True)
class Block:
    """One block of the stream: latent ranges of both modalities and the seconds it covers."""

    index: int
    video_start: int
    video_end: int
    audio_start: int
    audio_end: int
    sinks: int  # audio sink tokens that belong to this block (only block 0 of `prefix`)
    t_start: float  # seconds
    t_end: float

    @property
    def video_len(self) -> int:
        return self.video_end - self.video_start

    @property
    def audio_len(self) -> int:
        return self.audio_end - self.audio_start

    @property
    def audio_tokens(self) -> int:
        return self.sinks + self.audio_len


@dataclass(frozen=True)
class BlockLayout:
    """How latents are grouped into blocks. Data, not constants.

    `v2`: the released checkpoint's 4-3-3-3-3 (block 0 = first second incl. the 1-frame latents).
    `prefix`: the paper's Global Prefix (block 0 = first video + first audio latent + sinks),
    then one second per block.
    """

    kind: str
    first_video: int
    first_audio: int
    video_per_block: int
    audio_per_block: int
    num_sinks: int = 0
    time: TimeBase = DEFAULT_TIME

    # -- block <-> latent ---------------------------------------------------------------
    def block(self, k: int) -> Block:
        if k < 0:
            raise LayoutError(f"block index {k} < 0")
        if k == 0:
            vs, ve, as_, ae = 0, self.first_video, 0, self.first_audio
        else:
            vs = self.first_video + self.video_per_block * (k - 1)
            as_ = self.first_audio + self.audio_per_block * (k - 1)
            ve, ae = vs + self.video_per_block, as_ + self.audio_per_block
        t0 = 0.0 if k == 0 else self.block_t_start(k)
        t1 = self.block_t_end(k)
        return Block(k, vs, ve, as_, ae, self.num_sinks if k == 0 else 0, t0, t1)

    def block_t_start(self, k: int) -> float:
        return self.block_t_end(k - 1) if k > 0 else 0.0

    def block_t_end(self, k: int) -> float:
        """End time (s) of block k: time just after its last pixel frame's time stamp."""
        last_frame = self.time.video.frames_for_latents(self.block_latent_end(k)) - 1
        return last_frame / self.time.fps

    def block_latent_end(self, k: int) -> int:
        return self.first_video + self.video_per_block * k

    def video_block_of(self, latent: int) -> int:
        if latent < self.first_video:
            return 0
        return 1 + (latent - self.first_video) // self.video_per_block

    def audio_block_of(self, latent: int) -> int:
        if latent < self.first_audio:
            return 0
        return 1 + (latent - self.first_audio) // self.audio_per_block

    def iter_blocks(self, num_blocks: Optional[int] = None) -> Iterator[Block]:
        k = 0
        while num_blocks is None or k < num_blocks:
            yield self.block(k)
            k += 1

    # -- lengths ------------------------------------------------------------------------
    def latents_for_blocks(self, num_blocks: int) -> tuple[int, int]:
        b = self.block(num_blocks - 1)
        return b.video_end, b.audio_end

    def blocks_for_video_latents(self, f_v: int) -> int:
        """Number of blocks for f_v video latents, or an error naming the nearest valid count."""
        if f_v >= self.first_video and (f_v - self.first_video) % self.video_per_block == 0:
            return 1 + (f_v - self.first_video) // self.video_per_block
        valid = self._nearest_valid_video_latents(f_v)
        frames = self.time.video.frames_for_latents(valid)
        raise LayoutError(
            f"{f_v} video latents do not fit the '{self.kind}' layout "
            f"({self.first_video} + {self.video_per_block}k); nearest valid: {valid} latents = {frames} frames"
        )

    def _nearest_valid_video_latents(self, f_v: int) -> int:
        k = max(0, int(round((f_v - self.first_video) / self.video_per_block)))
        return self.first_video + self.video_per_block * k

    def blocks_for_frames(self, num_frames: int) -> int:
        """Blocks for a pixel frame count; frames must be 1 + 8*(latents-1) and fit the layout."""
        tv = self.time.video
        if num_frames <= 0:
            raise LayoutError(f"num_frames={num_frames}: length must be positive; nearest valid is "
                              f"{tv.frames_for_latents(self.first_video + self.video_per_block)} frames")
        if (num_frames - 1) % tv.stride:
            lat = max(1, int(round((num_frames - 1) / tv.stride)) + 1)
            valid = tv.frames_for_latents(self._nearest_valid_video_latents(lat))
            raise LayoutError(f"num_frames={num_frames} is not 1 + {tv.stride}k; nearest valid frame count is {valid}")
        return self.blocks_for_video_latents(1 + (num_frames - 1) // tv.stride)

    def blocks_for_seconds(self, seconds: float) -> int:
        """Blocks covering `seconds` of media. Only whole seconds fit; the error names the nearest."""
        if not math.isfinite(seconds) or round(seconds) < 1 or abs(seconds - round(seconds)) > 1e-6:
            near = max(1, int(round(seconds))) if math.isfinite(seconds) else 5
            raise LayoutError(f"seconds={seconds}: blocks cover whole seconds (at least 1); nearest valid is {near}")
        s = int(round(seconds))
        per_s = self.time.video_latents_per_second()
        return self.blocks_for_video_latents(1 + per_s * s)

    def seconds_for_blocks(self, num_blocks: int) -> float:
        return self.block_t_end(num_blocks - 1)


def make_layout(kind: str = "v2", num_sinks: int = 0, time: TimeBase = DEFAULT_TIME) -> BlockLayout:
    """The two layouts in the wild. `num_sinks` only makes sense with `prefix`."""
    vps, aps = time.video_latents_per_second(), time.audio_latents_per_second()
    if num_sinks < 0:
        raise LayoutError(f"num_sinks={num_sinks} must be >= 0")
    if kind == "v2":
        if num_sinks:
            raise LayoutError("the 'v2' layout has no sink tokens (the released checkpoint dropped them); "
                              "use layout 'prefix' for sinks or set num_sinks=0")
        # block 0 = the 1-frame latents plus the first second
        return BlockLayout("v2", 1 + vps, 1 + aps, vps, aps, 0, time)
    if kind == "prefix":
        return BlockLayout("prefix", 1, 1, vps, aps, num_sinks, time)
    raise LayoutError(f"unknown layout '{kind}'; valid layouts are 'v2' (4-3-3-3-3) and 'prefix'")


@dataclass(frozen=True)
class Clip:
    """What to generate: a layout, a frame size, a number of blocks (None: until the consumer stops),
    the seed and the batch size (batch item i draws the noise of seed + i)."""

    layout: BlockLayout
    height: int
    width: int
    num_blocks: Optional[int]
    seed: int = 0
    batch: int = 1

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.time.latent_grid(self.height, self.width)

    @property
    def tokens_per_latent(self) -> int:
        h, w = self.grid
        return h * w

    def _finite(self) -> int:
        if self.num_blocks is None:
            raise LayoutError("this clip is open-ended (num_blocks=None); give a length in seconds or blocks")
        return self.num_blocks

    @property
    def video_latents(self) -> int:
        return self.layout.latents_for_blocks(self._finite())[0]

    @property
    def audio_latents(self) -> int:
        return self.layout.latents_for_blocks(self._finite())[1]

    @property
    def num_frames(self) -> int:
        return self.layout.time.video.frames_for_latents(self.video_latents)

    @property
    def seconds(self) -> float:
        return self.layout.seconds_for_blocks(self._finite())

    def blocks(self) -> Iterator[Block]:
        return self.layout.iter_blocks(self.num_blocks)

    def video_shape(self, block: Optional[Block] = None) -> tuple[int, ...]:
        """Latent shape of one block's video, or of the whole clip's."""
        h, w = self.grid
        n = self.video_latents if block is None else block.video_len
        return (self.batch, self.layout.time.latent_channels, n, h, w)

    def audio_shape(self, block: Optional[Block] = None) -> tuple[int, ...]:
        t = self.layout.time
        n = self.audio_latents if block is None else block.audio_len
        return (self.batch, t.audio_channels, n, t.audio_mel_bins)


def make_clip(layout: BlockLayout, height: int, width: int, *, seconds: Optional[float] = None,
              num_frames: Optional[int] = None, num_blocks: Optional[int] = None, seed: int = 0,
              batch: int = 1) -> Clip:
    """Validate a requested size/length and return the clip, or raise a LayoutError that says the fix."""
    layout.time.latent_grid(height, width)
    given = [x is not None for x in (seconds, num_frames, num_blocks)]
    if sum(given) != 1:
        raise LayoutError("give exactly one of seconds, num_frames or num_blocks")
    if seconds is not None:
        n = layout.blocks_for_seconds(seconds)
    elif num_frames is not None:
        n = layout.blocks_for_frames(num_frames)
    else:
        if num_blocks < 1:
            raise LayoutError(f"num_blocks={num_blocks} must be >= 1; nearest valid is 1")
        n = num_blocks
    if batch < 1:
        raise LayoutError(f"batch={batch} must be >= 1")
    return Clip(layout, height, width, n, seed, batch)


__all__ = [
    "LayoutError", "CodecTime", "TimeBase", "DEFAULT_TIME", "Block", "BlockLayout", "make_layout",
    "Clip", "make_clip",
]
