"""A/V streaming test kit: decoders of any reach, a writer that records what it was handed, and what the
live writer put in each HLS segment (decoded back with ffmpeg)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as Fn

from omniforcing_core.decode import Decoder, TemporalContext, audio_decoder, video_decoder
from omniforcing_core.layout import DEFAULT_TIME, TimeBase
from omniforcing_core.live import read_playlist
from omniforcing_core.media import probe_media
from omniforcing_core.modality import AV


def window_mean(z: torch.Tensor, reach: TemporalContext, axis: int = 2) -> torch.Tensor:
    """Latent l -> mean of latents [l - left, l + right] along `axis` (ends replicated): exactly that reach."""
    x = z.movedim(axis, -1)
    n, k = x.shape[-1], reach.left + reach.right + 1
    p = Fn.pad(x.reshape(-1, 1, n), (reach.left, reach.right), mode="replicate")
    return p.unfold(-1, k, 1).mean(-1).reshape(x.shape).movedim(-1, axis)


def reach_decoders(video: TemporalContext, audio: TemporalContext, time: TimeBase = DEFAULT_TIME) -> AV[Decoder]:
    """Preview-like decoders with the given reach (ComfyUI's layout): video [B, 1 + 8(F-1), 32h, 32w, 3] in
    [0, 1], one colour per latent; audio [B, 2, (4T-3) * hop], a tone whose level follows the latent (whole
    sine periods per mel frame, so chunks join without clicks)."""
    up, hop = time.spatial_stride, time.samples_per_mel_frame

    def video_fn(z):
        z = window_mean(z.float(), video)
        rgb = torch.sigmoid(z[:, :3])
        idx = torch.tensor([time.video.latent_of_frame(t) for t in range(time.video.frames_for_latents(z.shape[2]))])
        return rgb[:, :, idx].repeat_interleave(up, 3).repeat_interleave(up, 4).permute(0, 2, 3, 4, 1)

    def audio_fn(z):
        z = window_mean(z.float(), audio)
        level = 0.25 + 0.2 * torch.tanh(z.mean(dim=(1, 3)))
        idx = torch.tensor([time.audio.latent_of_frame(t) for t in range(time.audio.frames_for_latents(z.shape[2]))])
        per = level[:, idx].repeat_interleave(hop, 1)
        wave = per * torch.sin(2 * torch.pi * 2 * (torch.arange(per.shape[1]) % hop) / hop)
        return torch.stack([wave, -wave], 1)

    return AV(video_decoder(video_fn, video, time), audio_decoder(audio_fn, audio, time))


@dataclass(frozen=True)
class Handed:
    """One call the writer got: frames and audio samples (`write_audio`: frames = 0)."""

    frames: int
    samples: int


class RecordingWriter:
    """Wraps a LiveWriter and records each call."""

    def __init__(self, writer):
        self.writer, self.calls = writer, []

    def __getattr__(self, name):
        return getattr(self.writer, name)

    def write(self, frames, audio=None):
        self.calls.append(Handed(len(frames), 0 if audio is None else audio.shape[-1]))
        return self.writer.write(frames, audio)

    def write_audio(self, audio):
        self.calls.append(Handed(0, audio.shape[-1]))
        return self.writer.write_audio(audio)

    def close(self):
        return self.writer.close()


@dataclass(frozen=True)
class SegmentEnd:
    """Where video and audio end (s) once the file is cut after this HLS segment."""

    segment: str
    video_end: float
    audio_end: float

    def skew_samples(self, sample_rate: int) -> float:
        return (self.audio_end - self.video_end) * sample_rate


def segment_ends(playlist: Path) -> list[SegmentEnd]:
    """Decode init.mp4 + segments 0..k back for every k: each segment's end time per track."""
    hls = Path(playlist).parent
    data = (hls / "init.mp4").read_bytes()
    rows = []
    with tempfile.TemporaryDirectory(prefix="omniforcing_segments_") as tmp:
        for k, name in enumerate(read_playlist(playlist).segments):
            data += (hls / name).read_bytes()
            cut = Path(tmp) / f"upto_{k:05d}.mp4"
            cut.write_bytes(data)
            info = probe_media(cut)
            rows.append(SegmentEnd(name, info.video.end, info.audio.end if info.audio else 0.0))
    return rows


def format_segment_table(title: str, rows: list[SegmentEnd], sample_rate: int) -> str:
    lines = [title, "| segment | video end (s) | audio end (s) | audio - video (samples) |", "|---|---|---|---|"]
    lines += [f"| {r.segment} | {r.video_end:.4f} | {r.audio_end:.4f} | {r.skew_samples(sample_rate):+.0f} |"
              for r in rows]
    return "\n".join(lines)
