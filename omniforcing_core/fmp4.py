"""Fragmented MP4 (ISO BMFF) boxes for the live writer, plus the H.264/AAC bitstream glue.

Why our own muxer instead of ffmpeg's: the live stream is encoded block by block, and we want
each block on disk, complete and decodable, the moment `write()` returns. ffmpeg's fragmenting
muxer holds the last fragment until the next keyframe and drops the AAC edit list in fragmented
mode (audio then plays 1024 samples late, > one frame at 24 kHz). Writing the boxes ourselves
is ~200 lines and makes both properties exact and testable.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

# ---------------------------------------------------------------------------------------------
# box primitives


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


_MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)

# ---------------------------------------------------------------------------------------------
# track descriptions


@dataclass(frozen=True)
class VideoTrack:
    """An H.264 track: parameter sets come from the first encoded block."""

    width: int
    height: int
    timescale: int
    sps: bytes
    pps: bytes


@dataclass(frozen=True)
class AudioTrack:
    """An AAC-LC track. `priming` encoder-delay samples are hidden by an edit list."""

    sample_rate: int
    channels: int
    priming: int = 1024

    @property
    def timescale(self) -> int:
        return self.sample_rate


Track = Union[VideoTrack, AudioTrack]


@dataclass(frozen=True)
class Sample:
    data: bytes
    duration: int  # in the track's timescale
    keyframe: bool = True


@dataclass
class TrackRun:
    """The samples one track contributes to one fragment, starting at `base_time` (decode time)."""

    track_id: int
    base_time: int
    samples: list[Sample] = field(default_factory=list)

    @property
    def duration(self) -> int:
        return sum(s.duration for s in self.samples)


# ---------------------------------------------------------------------------------------------
# AAC

AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
AAC_FRAME = 1024  # samples per AAC-LC access unit


def audio_specific_config(sample_rate: int, channels: int) -> bytes:
    """AudioSpecificConfig for AAC-LC (object type 2)."""
    if sample_rate not in AAC_SAMPLE_RATES:
        raise ValueError(f"AAC has no sample-rate index for {sample_rate} Hz; resample to one of {AAC_SAMPLE_RATES}")
    if not 1 <= channels <= 6:
        raise ValueError(f"channels={channels}: the live writer supports 1..6 AAC channels")
    return struct.pack(">H", (2 << 11) | (AAC_SAMPLE_RATES.index(sample_rate) << 7) | (channels << 3))


def split_adts(data: bytes) -> tuple[list[bytes], bytes]:
    """Raw AAC frames from an ADTS byte stream, plus the unfinished tail to prepend next time."""
    frames, i = [], 0
    while i + 7 <= len(data):
        if data[i] != 0xFF or (data[i + 1] & 0xF0) != 0xF0:
            raise ValueError(f"lost ADTS sync at byte {i}")
        header = 7 if data[i + 1] & 0x01 else 9  # protection_absent
        length = ((data[i + 3] & 0x03) << 11) | (data[i + 4] << 3) | (data[i + 5] >> 5)
        if i + length > len(data):
            break
        frames.append(bytes(data[i + header:i + length]))
        i += length
    return frames, bytes(data[i:])


def _descriptor(tag: int, payload: bytes) -> bytes:
    assert len(payload) < 128
    return bytes([tag, len(payload)]) + payload


def _esds(track: AudioTrack) -> bytes:
    dsi = _descriptor(0x05, audio_specific_config(track.sample_rate, track.channels))
    dcd = _descriptor(0x04, bytes([0x40, 0x15]) + b"\x00\x00\x00" + struct.pack(">II", 0, 0) + dsi)
    es = _descriptor(0x03, struct.pack(">HB", 0, 0) + dcd + _descriptor(0x06, b"\x02"))
    return full_box(b"esds", 0, 0, es)


# ---------------------------------------------------------------------------------------------
# H.264


def split_annexb(data: bytes) -> list[bytes]:
    """NAL units of an Annex-B byte stream (start codes removed)."""
    starts, i = [], data.find(b"\x00\x00\x01")
    while i >= 0:
        starts.append(i + 3)
        i = data.find(b"\x00\x00\x01", i + 3)
    nals = []
    for k, s in enumerate(starts):
        e = starts[k + 1] - 3 if k + 1 < len(starts) else len(data)
        nal = data[s:e].rstrip(b"\x00")  # a 4-byte start code leaves a zero on the previous NAL
        if nal:
            nals.append(bytes(nal))
    return nals


@dataclass(frozen=True)
class AccessUnit:
    nals: tuple[bytes, ...]

    @property
    def keyframe(self) -> bool:
        return any(n[0] & 0x1F == 5 for n in self.nals)


def access_units(nals: Sequence[bytes]) -> list[AccessUnit]:
    """Group NALs into frames; needs an access-unit delimiter (x264 `aud=1`) before each frame."""
    units: list[list[bytes]] = []
    for nal in nals:
        if nal[0] & 0x1F == 9 or not units:
            units.append([])
        units[-1].append(nal)
    return [AccessUnit(tuple(u)) for u in units]


def parameter_sets(nals: Sequence[bytes]) -> tuple[bytes, bytes]:
    sps = next((n for n in nals if n[0] & 0x1F == 7), None)
    pps = next((n for n in nals if n[0] & 0x1F == 8), None)
    if sps is None or pps is None:
        raise ValueError("H.264 stream has no SPS/PPS (its first frame must be an IDR)")
    return sps, pps


def avcc_sample(unit: AccessUnit, track: VideoTrack) -> bytes:
    """Length-prefixed sample; delimiters and parameter sets already in the init segment drop out."""
    out = []
    for nal in unit.nals:
        t = nal[0] & 0x1F
        if t == 9 or (t == 7 and nal == track.sps) or (t == 8 and nal == track.pps):
            continue
        out.append(struct.pack(">I", len(nal)) + nal)
    return b"".join(out)


def _avcc(track: VideoTrack) -> bytes:
    sps, pps = track.sps, track.pps
    body = bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]) + struct.pack(">H", len(sps)) + sps
    body += bytes([1]) + struct.pack(">H", len(pps)) + pps
    if sps[1] in (100, 110, 122, 144):  # high profiles carry chroma format / bit depth (4:2:0, 8 bit)
        body += bytes([0xFC | 1, 0xF8, 0xF8, 0])
    return box(b"avcC", body)


# ---------------------------------------------------------------------------------------------
# init segment

MOVIE_TIMESCALE = 1000


def _sample_entry(track: Track) -> bytes:
    if isinstance(track, VideoTrack):
        return box(b"avc1", b"\x00" * 6, struct.pack(">H", 1), b"\x00" * 16,
                   struct.pack(">HHIIIH", track.width, track.height, 0x00480000, 0x00480000, 0, 1),
                   b"\x00" * 32, struct.pack(">Hh", 0x18, -1), _avcc(track))
    return box(b"mp4a", b"\x00" * 6, struct.pack(">H", 1), b"\x00" * 8,
               struct.pack(">HHHHI", track.channels, 16, 0, 0, track.sample_rate << 16), _esds(track))


def _trak(track: Track, track_id: int, movie_timescale: int, duration: Optional[int]) -> bytes:
    video = isinstance(track, VideoTrack)
    w, h = (track.width, track.height) if video else (0, 0)
    tkhd = full_box(b"tkhd", 0, 3, struct.pack(">IIIII", 0, 0, track_id, 0, 0), b"\x00" * 8,
                    struct.pack(">hhhH", 0, 0, 0 if video else 0x0100, 0), _MATRIX,
                    struct.pack(">II", w << 16, h << 16))
    parts = [tkhd]
    if not video and track.priming:
        # Edit list: presentation starts after the encoder's priming samples, so sample 0 of the
        # waveform plays at t=0 together with video frame 0. Duration 0 = "the rest", used while the
        # stream grows; once the length is known it marks the last AAC frame's padding (honoured by
        # players that apply edit lists to fragmented files; ffmpeg only applies the start offset).
        span = 0 if duration is None else round(duration * movie_timescale / track.timescale)
        elst = full_box(b"elst", 0, 0, struct.pack(">IIiHH", 1, span, track.priming, 1, 0))
        parts.append(box(b"edts", elst))
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, track.timescale, 0, 0x55C4, 0))
    hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I4s", 0, b"vide" if video else b"soun"), b"\x00" * 12,
                    (b"VideoHandler" if video else b"SoundHandler") + b"\x00")
    media_header = full_box(b"vmhd", 0, 1, b"\x00" * 8) if video else full_box(b"smhd", 0, 0, b"\x00" * 4)
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    empty = struct.pack(">I", 0)
    stbl = box(b"stbl", full_box(b"stsd", 0, 0, struct.pack(">I", 1), _sample_entry(track)),
               full_box(b"stts", 0, 0, empty), full_box(b"stsc", 0, 0, empty),
               full_box(b"stsz", 0, 0, empty, empty), full_box(b"stco", 0, 0, empty))
    parts.append(box(b"mdia", mdhd, hdlr, box(b"minf", media_header, dinf, stbl)))
    return box(b"trak", *parts)


def init_segment(tracks: Sequence[Track], *, movie_timescale: int = MOVIE_TIMESCALE,
                 audio_duration: Optional[int] = None) -> bytes:
    """ftyp + moov with empty sample tables; track ids are 1.. in the given order.

    audio_duration (samples, known at the end of a stream) goes into the audio edit list; the init
    segment keeps its size, so a finished file can be patched in place.
    """
    ftyp = box(b"ftyp", b"iso6", struct.pack(">I", 1), b"iso6isomiso5avc1mp41")
    mvhd = full_box(b"mvhd", 0, 0, struct.pack(">IIIIIH", 0, 0, movie_timescale, 0, 0x00010000, 0x0100),
                    b"\x00" * 10, _MATRIX, b"\x00" * 24, struct.pack(">I", len(tracks) + 1))
    trex = [full_box(b"trex", 0, 0, struct.pack(">IIIII", i + 1, 1, 0, 0, 0)) for i in range(len(tracks))]
    traks = [_trak(t, i + 1, movie_timescale, audio_duration) for i, t in enumerate(tracks)]
    return ftyp + box(b"moov", mvhd, *traks, box(b"mvex", *trex))


# ---------------------------------------------------------------------------------------------
# media fragments

_SYNC = 0x02000000  # sample_depends_on = 2: decodable alone
_NON_SYNC = 0x01010000  # depends on others, not a sync sample


def _moof(sequence: int, runs: Sequence[TrackRun], data_offsets: Sequence[int]) -> bytes:
    trafs = []
    for run, offset in zip(runs, data_offsets):
        entries = b"".join(struct.pack(">III", s.duration, len(s.data), _SYNC if s.keyframe else _NON_SYNC)
                           for s in run.samples)
        trafs.append(box(b"traf",
                         full_box(b"tfhd", 0, 0x020000, struct.pack(">I", run.track_id)),  # default-base-is-moof
                         full_box(b"tfdt", 1, 0, struct.pack(">Q", run.base_time)),
                         full_box(b"trun", 0, 0x000701, struct.pack(">Ii", len(run.samples), offset), entries)))
    return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)


def media_fragment(sequence: int, runs: Sequence[TrackRun]) -> bytes:
    """moof + mdat for one fragment; empty runs are left out. `sequence` starts at 1."""
    runs = [r for r in runs if r.samples]
    if not runs:
        return b""
    sizes = [sum(len(s.data) for s in r.samples) for r in runs]
    moof_size = len(_moof(sequence, runs, [0] * len(runs)))
    offsets, at = [], moof_size + 8
    for n in sizes:
        offsets.append(at)
        at += n
    payload = b"".join(s.data for r in runs for s in r.samples)
    return _moof(sequence, runs, offsets) + box(b"mdat", payload)


__all__ = [
    "VideoTrack", "AudioTrack", "Track", "Sample", "TrackRun", "AccessUnit", "AAC_SAMPLE_RATES", "AAC_FRAME",
    "audio_specific_config", "split_adts", "split_annexb", "access_units", "parameter_sets", "avcc_sample",
    "init_segment", "media_fragment",
]
