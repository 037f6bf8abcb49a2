"""Generated blocks -> decoded frames and samples -> live files, one block at a time.

`AVStreamer` owns the two streaming decoders and (optionally) a live writer. Feed it each
`BlockResult` as the sampler yields it; it decodes what is final, writes it, and returns it. A
stop at any point leaves every written block on disk and playable; `finish()` flushes the frames
held back for the decoders' right context and closes the files.

Decoder contract (ComfyUI's VAE layout): video `decode(latents [1, C, F, h, w]) -> [1, N, H, W, 3]`
in [0, 1] with N = 1 + 8(F-1); audio `decode(latents [1, 8, T, 16]) -> [1, channels, S]` with
S = (4T-3) * samples per mel frame.
"""
from __future__ import annotations

import time as _time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .decode import AudioStreamingDecoder, StreamingDecoder, TemporalContext
from .layout import DEFAULT_TIME, TimeBase
from .sampling import BlockResult

Decode = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class AVChunk:
    """What became final after one block: frames [N, H, W, 3] float in [0, 1] and audio [C, S]."""

    block_index: int
    frames: Optional[torch.Tensor]
    audio: Optional[torch.Tensor]
    first_frame: int  # index of frames[0] in the whole stream
    first_sample: int
    decode_ms: float = 0.0
    write_ms: float = 0.0


@dataclass
class StreamStats:
    blocks: int = 0
    frames: int = 0
    samples: int = 0
    ttfc_s: Optional[float] = None  # first playable chunk on disk, from `start`
    started: float = field(default_factory=_time.perf_counter)


class AVStreamer:
    def __init__(self, video_decode: Decode, audio_decode: Decode, *, video_context: TemporalContext,
                 audio_context: TemporalContext, writer=None, time: TimeBase = DEFAULT_TIME,
                 audio_crossfade: int = 0, batch_index: int = 0):
        self.time, self.writer, self.batch_index = time, writer, batch_index
        self.video = StreamingDecoder(video_decode, time.video, video_context, latent_axis=2, out_axis=1)
        self.audio = StreamingDecoder(audio_decode, time.audio, audio_context, latent_axis=2, out_axis=-1,
                                      samples_per_frame=time.samples_per_mel_frame, crossfade=audio_crossfade)
        self.stats = StreamStats()
        self._pending_audio: list[torch.Tensor] = []

    def _pick(self, x: torch.Tensor) -> torch.Tensor:
        return x[self.batch_index:self.batch_index + 1]

    def push(self, result: BlockResult) -> AVChunk:
        return self._step(result.block.index, self._pick(result.video), self._pick(result.audio))

    def finish(self) -> AVChunk:
        chunk = self._step(-1, None, None)
        if self.writer is not None:
            self.writer.close()
        return chunk

    def _step(self, index: int, video: Optional[torch.Tensor], audio: Optional[torch.Tensor]) -> AVChunk:
        t0 = _time.perf_counter()
        first_frame, first_sample = self.video.emitted, self.audio.emitted
        if video is None:
            vc, ac = self.video.flush(), self.audio.flush()
        else:
            vc, ac = self.video.push(video), self.audio.push(audio)
        frames = vc.data[0].float().clamp(0, 1) if vc is not None else None
        wav = ac.data[0].float() if ac is not None else None
        t1 = _time.perf_counter()
        if self.writer is not None and frames is not None:
            self._write(frames, wav)
        elif wav is not None:
            self._pending_audio.append(wav)  # audio ahead of the video: ride with the next frames
        if video is None and self.writer is not None and self._pending_audio:
            # the end: no frames are left to carry the audio tail, so it goes in on its own
            self.writer.write_audio(torch.cat(self._pending_audio, -1).cpu().numpy())
            self._pending_audio = []
        t2 = _time.perf_counter()
        s = self.stats
        s.blocks += video is not None
        s.frames += 0 if frames is None else frames.shape[0]
        s.samples += 0 if wav is None else wav.shape[-1]
        if s.ttfc_s is None and frames is not None:
            s.ttfc_s = t2 - s.started
        return AVChunk(index, frames, wav, first_frame, first_sample, (t1 - t0) * 1000, (t2 - t1) * 1000)

    def _write(self, frames: torch.Tensor, wav: Optional[torch.Tensor]) -> None:
        parts = self._pending_audio + ([wav] if wav is not None else [])
        self._pending_audio = []
        # no final audio yet is an empty block, not None (None would pad silence and shift later audio)
        audio = torch.cat(parts, -1) if parts else torch.zeros(self.writer.channels, 0)
        self.writer.write(frames.cpu().numpy(), audio.cpu().numpy())


def preview_streamer(writer=None, time: TimeBase = DEFAULT_TIME) -> AVStreamer:
    """A streamer over the deterministic preview decoders (the embedded default's codecs)."""
    from .preview import PreviewAudioDecoder, PreviewVideoDecoder

    pv, pa = PreviewVideoDecoder(time), PreviewAudioDecoder(time)
    return AVStreamer(lambda z: pv(z).permute(0, 2, 3, 4, 1), pa,
                      video_context=TemporalContext(pv.left_context, pv.right_context),
                      audio_context=TemporalContext(pa.left_context, pa.right_context), writer=writer, time=time)


__all__ = ["AVChunk", "AVStreamer", "StreamStats", "preview_streamer", "AudioStreamingDecoder"]
