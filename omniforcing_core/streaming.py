"""The streaming driver: generated blocks -> streaming decoders -> A/V-aligned live writes, surviving any stop.

* `DecodePlan`: the video and audio `Decoder`s a stream uses, from a mode. `exact` keeps each
  decoder's own reach: the stream equals decoding the whole clip at once, at the cost of latency
  (LTX-2's video VAE is non-causal and reaches ~14 latents = 4.7 s each way) and of context decoded
  again per block. `balanced` / `fast` cap the reach at a short look-ahead and crossfade audio seams.
* `AVStreamer`: per block, decodes what became final in each modality and hands the writer equal
  spans of time: frames [f0, f1) with audio samples [s(f0), s(f1)), s(f) = round(f * rate / fps).
  Whichever modality is decoded ahead waits in a buffer for the other; `finish()` flushes both
  decoders and writes everything left, so audio and video end together.
* `GivenMedia`: in a conditioned stream (A->V, V->A) the output carries the user's own audio or
  video, not a decode of its latents: it stands in for that modality's decoder and hands out, after
  each block, the original samples / frames up to where the decoder's output would end.
* `run_stream`: the loop. Whatever stops it (the end, an error, a host's cancel), what was generated
  is decoded and written and the files are closed valid before it re-raises; it measures the time to
  the first chunk on disk.
"""
from __future__ import annotations

import dataclasses
import time as _time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from .decode import DecodedChunk, Decoder, ProbedReach, StreamingDecoder, TemporalContext, probe_reach
from .layout import DEFAULT_TIME, TimeBase
from .modality import AV
from .sampling import MODALITIES, BlockResult, GivenError

MODES = ("exact", "balanced", "fast")


@dataclass(frozen=True)
class Preset:
    """Reach caps in latents (left only costs compute; right is latency) and the audio seam crossfade."""

    reach: AV[TemporalContext]
    audio_crossfade_mel_frames: int


PRESETS = {
    "balanced": Preset(AV(TemporalContext(6, 3), TemporalContext(16, 3)), 4),
    "fast": Preset(AV(TemporalContext(2, 1), TemporalContext(8, 1)), 4),
}

# Probe lengths (latents each side of the middle) for decoders of unknown reach; LTX-2's VAEs reach
# ~14 latents (video) and ~37 back / 5 ahead (audio).
PROBE_LATENTS_PER_SIDE = AV(16, 48)


def stream_time(sample_rate: int, base: TimeBase = DEFAULT_TIME) -> TimeBase:
    """The time base of a stream whose audio decoder outputs `sample_rate` Hz."""
    return dataclasses.replace(base, audio_sample_rate=int(sample_rate))


@dataclass(frozen=True)
class DecodePlan:
    mode: str
    decoders: AV[Decoder]
    time: TimeBase


def decode_plan(mode: str, decoders: AV[Decoder], time: TimeBase = DEFAULT_TIME) -> DecodePlan:
    """The decoders for `mode`. A preset caps each reach (a decoder already within the cap stays exact;
    one of unknown reach gets the cap, with the audio crossfade)."""
    if mode == "exact":
        for name, d in (("video", decoders.video), ("audio", decoders.audio)):
            if d.reach is None:
                raise ValueError(f"exact decode needs the {name} decoder's reach; measure it with measure_reach")
        return DecodePlan(mode, decoders, time)
    if mode not in PRESETS:
        raise ValueError(f"unknown decode mode '{mode}'; use one of {', '.join(MODES)}")
    preset = PRESETS[mode]

    def cap(d: Decoder, reach: TemporalContext, crossfade_frames: int) -> Decoder:
        if d.reach is not None and reach.covers(d.reach):
            return d
        capped = reach if d.reach is None else d.reach.cap(reach)
        return d.with_reach(capped, max(d.crossfade, crossfade_frames * d.samples_per_frame))

    return DecodePlan(mode, AV(cap(decoders.video, preset.reach.video, 0),
                               cap(decoders.audio, preset.reach.audio, preset.audio_crossfade_mel_frames)), time)


def probe_latents(kind: str, time: TimeBase = DEFAULT_TIME, per_side: Optional[int] = None) -> torch.Tensor:
    """Random latents in LTX-2's layout (tiny spatial size) long enough to measure a reach of `per_side`."""
    n = 2 * (per_side or getattr(PROBE_LATENTS_PER_SIDE, kind)) + 3
    shape = (1, time.latent_channels, n, 2, 2) if kind == "video" else (1, time.audio_channels, n, time.audio_mel_bins)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def measure_reach(decoder: Decoder, kind: str, time: TimeBase = DEFAULT_TIME) -> ProbedReach:
    """Probe a `video` / `audio` decoder of unknown reach (3 decodes of `probe_latents(kind)`)."""
    return probe_reach(decoder, probe_latents(kind, time))


# ---------------------------------------------------------------------------------------------
# decoding both modalities, aligned in time


@dataclass
class AVChunk:
    """What was handed to the writer after one block: frames [N, H, W, 3] in [0, 1] and audio [C, S]
    covering the same time (except at the very end, where each modality's remainder goes out)."""

    block_index: int  # -1 for the final flush
    frames: Optional[torch.Tensor]
    audio: Optional[torch.Tensor]
    first_frame: int  # index of frames[0] in the whole stream
    first_sample: int
    decode_ms: float = 0.0
    write_ms: float = 0.0

    @property
    def end_frame(self) -> int:
        return self.first_frame + (0 if self.frames is None else self.frames.shape[0])

    @property
    def end_sample(self) -> int:
        return self.first_sample + (0 if self.audio is None else self.audio.shape[-1])


class _Pending:
    """Decoded output not written yet, along one time axis."""

    def __init__(self, axis: int):
        self.axis, self.parts, self.length, self.start = axis, [], 0, 0

    def add(self, x: Optional[torch.Tensor]) -> None:
        if x is not None and x.shape[self.axis]:
            self.parts.append(x)
            self.length += x.shape[self.axis]

    @property
    def end(self) -> int:
        return self.start + self.length

    def take(self, n: int) -> Optional[torch.Tensor]:
        if n <= 0:
            return None
        whole = torch.cat(self.parts, self.axis) if len(self.parts) > 1 else self.parts[0]
        out, rest = whole.narrow(self.axis, 0, n), whole.narrow(self.axis, n, self.length - n)
        self.parts = [rest] if rest.shape[self.axis] else []
        self.length -= n
        self.start += n
        return out


class AVAligner:
    """Buffers decoded frames and samples; releases frames [f0, f1) with samples [s(f0), s(f1)) once both
    are decoded, where s(f) = `time.sample_at_frame(f)` is the audio sample at video frame f."""

    def __init__(self, time: TimeBase):
        self.sample_at = time.sample_at_frame
        self.samples_per_frame = time.samples_per_video_frame
        self.video, self.audio = _Pending(0), _Pending(-1)

    def add(self, frames: Optional[torch.Tensor], audio: Optional[torch.Tensor]) -> None:
        self.video.add(frames)
        self.audio.add(audio)

    def take(self, final: bool = False, common: bool = False) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor],
                                                                      int, int]:
        """(frames, audio, first frame, first sample) that can be written now; at the end, everything -
        or with `common`, no frame that starts after the audio ends (a stream cut short)."""
        f0, s0 = self.video.start, self.audio.start
        if final:
            f1 = self.video.end
            if common:
                f1 = f0
                while f1 < self.video.end and self.sample_at(f1) < self.audio.end:
                    f1 += 1
            return self.video.take(f1 - f0), self.audio.take(self.audio.length), f0, s0
        f1 = min(self.video.end, int(self.audio.end / self.samples_per_frame))
        while f1 < self.video.end and self.sample_at(f1 + 1) <= self.audio.end:
            f1 += 1
        while f1 > f0 and self.sample_at(f1) > self.audio.end:
            f1 -= 1
        if f1 <= f0:
            return None, None, f0, s0
        return self.video.take(f1 - f0), self.audio.take(self.sample_at(f1) - s0), f0, s0


@dataclass(frozen=True)
class GivenMedia:
    """The user's own audio or video of a conditioned stream, on the stream's time base: video frames
    [N, H, W, 3] in [0, 1] at the stream's fps (frame i shown at i / fps, the stream's frame size) or
    audio [C, S] at the stream's sample rate (sample s at s / rate). Shorter than the stream: the
    last frame is held / silence follows; longer: the rest is not written."""

    modality: str
    data: torch.Tensor

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise GivenError(f"given media modality '{self.modality}' is not one of {', '.join(MODALITIES)}")
        want = 4 if self.modality == "video" else 2
        if self.data.dim() != want or (self.modality == "video" and self.data.shape[-1] != 3):
            shape = "[N, H, W, 3]" if self.modality == "video" else "[C, S]"
            raise GivenError(f"given {self.modality} must be {shape}, got shape {tuple(self.data.shape)}")
        if self.data.shape[0 if self.modality == "video" else 1] == 0:
            raise GivenError(f"the given {self.modality} is empty")

    @property
    def axis(self) -> int:
        return 0 if self.modality == "video" else -1

    def span(self, start: int, end: int) -> torch.Tensor:
        """Frames / samples [start, end), held or silent past the end of the data."""
        n = self.data.shape[self.axis]
        have = self.data.narrow(self.axis, min(start, n), max(0, min(end, n) - start))
        missing = end - start - have.shape[self.axis]
        if missing <= 0:
            return have
        if self.modality == "video":
            pad = self.data[-1:].expand(missing, *self.data.shape[1:])
        else:
            pad = self.data.new_zeros(self.data.shape[0], missing)
        return torch.cat([have, pad], self.axis)


class _GivenSource:
    """Stands in for the given modality's `StreamingDecoder`: after each block, the original media up to
    where the decoder's output for the latents so far would end (no decode, no look-ahead)."""

    def __init__(self, decoder: Decoder, media: GivenMedia):
        self.decoder, self.media = decoder, media
        self._latents = self._out = 0

    def push(self, latents: torch.Tensor) -> Optional[DecodedChunk]:
        self._latents += latents.shape[self.decoder.latent_axis]
        end = self.decoder.output_length(self._latents)
        if end <= self._out:
            return None
        chunk = DecodedChunk(self.media.span(self._out, end)[None], self._out, end)
        self._out = end
        return chunk

    def flush(self) -> Optional[DecodedChunk]:
        return None  # everything was handed out at push time


class AVStreamer:
    """Each `BlockResult` -> both streaming decoders -> aligned frames + audio -> the writer (if any).

    Decoders follow ComfyUI's layout (see `decode.video_decoder` / `audio_decoder`); batch item
    `batch_index` is decoded. `given` (a `GivenMedia`): that modality is the user's original media,
    not decoded. `finish()` flushes the decoders, writes the rest and closes the writer."""

    def __init__(self, plan: DecodePlan, writer=None, batch_index: int = 0, given: Optional[GivenMedia] = None):
        self.plan, self.writer, self.batch_index = plan, writer, batch_index
        channels = getattr(writer, "channels", None)
        if given is not None and given.modality == "audio" and channels and given.data.shape[0] != channels:
            if given.data.shape[0] != 1:
                raise GivenError(f"the given audio has {given.data.shape[0]} channels, the output {channels}: "
                                 f"give mono or {channels}-channel audio")
            given = GivenMedia("audio", given.data.expand(channels, -1))
        self.video = (_GivenSource(plan.decoders.video, given) if given is not None and given.modality == "video"
                      else StreamingDecoder(plan.decoders.video))
        self.audio = (_GivenSource(plan.decoders.audio, given) if given is not None and given.modality == "audio"
                      else StreamingDecoder(plan.decoders.audio))
        self.aligner = AVAligner(plan.time)

    def _pick(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.batch_index:self.batch_index + 1]

    def push(self, result: BlockResult) -> AVChunk:
        t0 = _time.perf_counter()
        vc, ac = self.video.push(self._pick(result.video)), self.audio.push(self._pick(result.audio))
        return self._deliver(result.block.index, vc, ac, t0, final=False)

    def finish(self, stopped: bool = False) -> AVChunk:
        """Flush both decoders, write the rest and close the writer. `stopped` (the stream was cut short,
        maybe inside one decoder's push, so the other never got that block): write only the span both
        modalities cover, so the files still end with audio and video together."""
        t0 = _time.perf_counter()
        chunk = self._deliver(-1, self.video.flush(), self.audio.flush(), t0, final=True, common=stopped)
        if self.writer is not None:
            self.writer.close()
        return chunk

    def _deliver(self, index: int, vc, ac, t0: float, final: bool, common: bool = False) -> AVChunk:
        self.aligner.add(vc.data[0].float().clamp(0, 1) if vc is not None else None,
                         ac.data[0].float() if ac is not None else None)
        frames, audio, f0, s0 = self.aligner.take(final, common)
        t1 = _time.perf_counter()
        if self.writer is not None:
            if frames is not None:
                # no audio for these frames is an empty block, not None (None would pad silence)
                wave = audio if audio is not None else torch.zeros(self.writer.channels, 0)
                self.writer.write(frames.cpu().numpy(), wave.cpu().numpy())
            elif audio is not None:  # the end: audio past the last frame goes in on its own
                self.writer.write_audio(audio.cpu().numpy())
        return AVChunk(index, frames, audio, f0, s0, (t1 - t0) * 1000, (_time.perf_counter() - t1) * 1000)


# ---------------------------------------------------------------------------------------------
# the loop


@dataclass
class StreamRun:
    """What a stream produced (kept parts only), how long it took and how it ended."""

    fps: float
    sample_rate: int
    blocks: int = 0
    frames: list = field(default_factory=list)  # [N, H, W, 3] chunks (if kept)
    waves: list = field(default_factory=list)  # [C, S] chunks (if kept)
    last_frame: Optional[torch.Tensor] = None
    num_frames: int = 0
    num_samples: int = 0
    ttfc_s: Optional[float] = None  # from the call to the first frames handed to the writer
    wall_s: float = 0.0
    interrupted: Optional[BaseException] = None

    def video(self) -> Optional[torch.Tensor]:
        return torch.cat(self.frames) if self.frames else None

    def audio(self) -> Optional[torch.Tensor]:
        return torch.cat(self.waves, dim=-1) if self.waves else None

    def _keep(self, chunk: AVChunk, keep_video: bool, keep_audio: bool, started: float) -> None:
        if chunk.frames is not None:
            self.last_frame = chunk.frames[-1].cpu()
            self.num_frames += chunk.frames.shape[0]
            if keep_video:
                self.frames.append(chunk.frames.cpu())
            if self.ttfc_s is None:
                self.ttfc_s = _time.perf_counter() - started
        if chunk.audio is not None:
            self.num_samples += chunk.audio.shape[-1]
            if keep_audio:
                self.waves.append(chunk.audio.cpu())


def run_stream(blocks: Iterable[BlockResult], plan: DecodePlan, writer=None, *, keep_video: bool = True,
               keep_audio: bool = True, on_block: Optional[Callable[[BlockResult, AVChunk], None]] = None,
               batch_index: int = 0, given: Optional[GivenMedia] = None,
               stop_on: tuple[type, ...] = ()) -> StreamRun:
    """Decode every block of `blocks` with `plan` and write it (if a writer is given), then close the writer.
    `given`: a conditioned stream's original audio or video, written in place of that modality's decode.

    on_block(block_result, chunk) runs after each block (progress, previews, UI events). Any exception
    stops generation; the blocks made so far are still decoded and written and the files closed, then
    the exception propagates (so a host's cancel keeps valid, playable files) - unless it is one of
    `stop_on` (a host's cancel, wherever it lands: sampling, decoding, a progress hook), which ends the
    stream like its last block: the run is returned with `interrupted` set."""
    started = _time.perf_counter()
    streamer = AVStreamer(plan, writer, batch_index, given)
    run = StreamRun(plan.time.fps, plan.time.audio_sample_rate)
    try:
        for res in blocks:
            chunk = streamer.push(res)
            run._keep(chunk, keep_video, keep_audio, started)
            run.blocks += 1
            if on_block is not None:
                on_block(res, chunk)
    except BaseException as e:  # noqa: BLE001 - also the host's interrupt, which is not an Exception
        run.interrupted = e
    try:
        run._keep(streamer.finish(stopped=run.interrupted is not None), keep_video, keep_audio, started)
    except BaseException:  # noqa: BLE001
        if run.interrupted is None:
            raise
        # already stopping: keep the first reason, but the files must still be closed
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass
    run.wall_s = _time.perf_counter() - started
    if run.interrupted is not None and not isinstance(run.interrupted, stop_on):
        raise run.interrupted
    return run


__all__ = ["MODES", "Preset", "PRESETS", "PROBE_LATENTS_PER_SIDE", "stream_time", "DecodePlan", "decode_plan",
           "probe_latents", "measure_reach", "AVChunk", "AVAligner", "GivenMedia", "AVStreamer", "StreamRun",
           "run_stream"]
