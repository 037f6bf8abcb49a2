"""Streaming decode == offline decode, on toy conv decoders whose receptive field we know by construction."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as Fn

from harness.decode import probe_reach_per_latent, split_blocks, stream_vs_offline
from omniforcing_core.decode import Decoder, StreamingDecoder, TemporalContext, audio_decoder, probe_reach
from omniforcing_core.layout import DEFAULT_TIME

VIDEO = DEFAULT_TIME.video
AUDIO = DEFAULT_TIME.audio


@pytest.fixture(autouse=True, scope="module")
def _float64_single_thread():
    """float64 so 'exact' means < 1e-12; one thread because these convs are tiny (10x faster on 2 cores)."""
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# toy decoders (random weights, float64)


def _temporal_conv(x: torch.Tensor, weight: torch.Tensor, causal: bool) -> torch.Tensor:
    """Conv over time of x [N, C, T]; causal pads the past by repeating frame 0 (like LTX's causal conv)."""
    k = weight.shape[-1]
    if causal:
        x = torch.cat([x[:, :, :1].expand(-1, -1, k - 1), x], dim=2)
    else:
        x = Fn.pad(x, ((k - 1) // 2, k // 2), mode="replicate")
    return Fn.conv1d(x, weight)


def _causal_upsample(x: torch.Tensor, weight: torch.Tensor, factor: int) -> torch.Tensor:
    """Depth-to-space in time, dropping the first factor-1 frames: F steps -> 1 + factor (F - 1)."""
    y = Fn.conv1d(x, weight)  # [N, C*factor, F]
    n, cf, f = y.shape
    y = y.reshape(n, cf // factor, factor, f).permute(0, 1, 3, 2).reshape(n, cf // factor, f * factor)
    return y[:, :, factor - 1:]


class ToyDecoder:
    """Latent-rate convs -> causal-first-frame upsampler -> frame-rate convs, along time only.

    Receptive field (latents): left = sum(k-1 of latent convs) + the frame convs' reach in latents
    (causal), or half of each on both sides (non-causal).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, latent_kernels, frame_kernels, causal: bool, seed: int):
        g = torch.Generator().manual_seed(seed)
        w = lambda co, ci, k: torch.randn(co, ci, k, generator=g) / (ci * k) ** 0.5  # noqa: E731
        hidden = 6
        self.causal, self.stride = causal, stride
        chans = [c_in] + [hidden] * len(latent_kernels)
        self.latent_w = [w(chans[i + 1], chans[i], k) for i, k in enumerate(latent_kernels)]
        self.up_w = w(hidden * stride, chans[-1], 1)
        fchans = [hidden] * len(frame_kernels) + [c_out]
        self.frame_w = [w(fchans[i + 1], fchans[i], k) for i, k in enumerate(frame_kernels)]
        if not frame_kernels:
            self.frame_w = [w(c_out, hidden, 1)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [N, C, F] -> [N, c_out, frames]
        for w in self.latent_w:
            x = torch.tanh(_temporal_conv(x, w, self.causal))
        x = _causal_upsample(x, self.up_w, self.stride)
        for i, w in enumerate(self.frame_w):
            x = _temporal_conv(x, w, self.causal)
            x = torch.tanh(x) if i + 1 < len(self.frame_w) else x
        return x


def video_decoder(core: ToyDecoder, layout: str):
    """Latents [B, C, F, h, w] -> frames [B, F, h, w, 3] ('comfy', time axis 1) or [B, 3, F, h, w]."""
    def decode(z: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = z.shape
        y = core(z.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, f))
        y = y.reshape(b, h, w, y.shape[1], y.shape[2])
        return y.permute(0, 4, 1, 2, 3) if layout == "comfy" else y.permute(0, 3, 4, 1, 2)
    return decode


class ToyVocoder:
    """Mel [B, 2, T, mels] -> waveform [B, 2, T * prod(factors)]: non-causal convs + nearest upsampling."""

    def __init__(self, mels: int, factors, seed: int, kernel: int = 5):
        g = torch.Generator().manual_seed(seed)
        w = lambda co, ci, k: torch.randn(co, ci, k, generator=g) / (ci * k) ** 0.5  # noqa: E731
        self.factors = factors
        self.w_in = w(8, 2 * mels, kernel)
        self.w_up = [w(8, 8, 3) for _ in factors]
        self.w_out = w(2, 8, 3)

    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        b, ch, t, m = mel.shape
        x = torch.tanh(_temporal_conv(mel.permute(0, 1, 3, 2).reshape(b, ch * m, t), self.w_in, causal=False))
        for f, w in zip(self.factors, self.w_up):
            x = torch.tanh(_temporal_conv(x.repeat_interleave(f, dim=2), w, causal=False))
        return _temporal_conv(x, self.w_out, causal=False)


class ToyAudioVAE:
    """Latents [B, 8, T, 16] -> mel [B, 2, 1 + 4 (T - 1), 16], causal."""

    def __init__(self, seed: int):
        self.core = ToyDecoder(8 * 16, 2 * 16, AUDIO.stride, (3,), (3,), causal=True, seed=seed)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        b, c, t, m = z.shape
        y = self.core(z.permute(0, 1, 3, 2).reshape(b, c * m, t))
        return y.reshape(b, 2, 16, y.shape[-1]).permute(0, 1, 3, 2)


# a smaller-than-real hop (12 samples per mel frame) keeps most tests fast; one test runs the real x240
TOY_FACTORS = (2, 3, 2)
REAL_FACTORS = (4, 6, 10)


# ---------------------------------------------------------------------------------------------
# fixtures: each decoder with its known receptive field

FRAMES_PER_LATENT = VIDEO.stride


def make_causal():
    # latent convs k=3,3 reach 4 latents back; frame convs k=5,4 reach 7 frames back -> 1 latent
    core = ToyDecoder(4, 3, VIDEO.stride, (3, 3), (5, 4), causal=True, seed=1)
    return Decoder(video_decoder(core, "comfy"), VIDEO, TemporalContext(5, 0), latent_axis=2, out_axis=1)


def make_causal_frame_only():
    # no latent-rate conv: frame convs k=9,4 reach 11 frames back -> 2 latents; here the
    # first window latent's single frame would be read, so the sacrificial latent matters
    core = ToyDecoder(4, 3, VIDEO.stride, (), (9, 4), causal=True, seed=2)
    return Decoder(video_decoder(core, "comfy"), VIDEO, TemporalContext(2, 0), latent_axis=2, out_axis=1)


def make_noncausal():
    # latent convs k=3,5 reach +-3 latents; frame convs k=5,5 reach +-4 frames -> +-1 latent
    core = ToyDecoder(4, 3, VIDEO.stride, (3, 5), (5, 5), causal=False, seed=3)
    return Decoder(video_decoder(core, "channels"), VIDEO, TemporalContext(4, 4), latent_axis=2, out_axis=2)


VIDEO_DECODERS = {"causal": make_causal, "causal_frame_only": make_causal_frame_only, "noncausal": make_noncausal}


def video_latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, n, 2, 3, generator=torch.Generator().manual_seed(seed))


def audio_latents(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, DEFAULT_TIME.audio_channels, n, DEFAULT_TIME.audio_mel_bins,
                       generator=torch.Generator().manual_seed(seed))


TOY_TIME = dataclasses.replace(DEFAULT_TIME, audio_sample_rate=int(DEFAULT_TIME.mel_rate) * 12)


def make_audio(context: TemporalContext, crossfade: int = 0, time=TOY_TIME, factors=TOY_FACTORS) -> Decoder:
    """Audio VAE then vocoder, streamed as one decoder (waveform on the last axis)."""
    assert time.samples_per_mel_frame == math.prod(factors)
    vae, vocoder = ToyAudioVAE(seed=4), ToyVocoder(16, factors, seed=5)
    return dataclasses.replace(audio_decoder(lambda z: vocoder(vae(z)), context, time), crossfade=crossfade)


# audio VAE: latent conv 2 back + mel conv 2 frames back (1 latent) = 3; vocoder: k=5 -> +-2 mel
# frames plus sub-frame reach of the upsampling convs -> +-3 mel frames -> +-1 latent
AUDIO_CONTEXT = TemporalContext(4, 1)

BLOCKINGS = [(4, 3, 3, 3, 3), (1, 3, 3, 3), (2, 1, 5, 1, 1, 4), (16,)]


# ---------------------------------------------------------------------------------------------
# receptive fields are what we built


@pytest.mark.parametrize("name", VIDEO_DECODERS)
def test_probe_finds_known_receptive_field(name):
    dec = VIDEO_DECODERS[name]()
    assert probe_reach(dec, video_latents(16)) == (dec.reach, False)
    assert probe_reach_per_latent(dec, video_latents(16)) == dec.reach  # the exhaustive probe agrees


def test_probe_finds_audio_receptive_field():
    dec = make_audio(AUDIO_CONTEXT)
    assert probe_reach(dec, audio_latents(14)) == (AUDIO_CONTEXT, False)
    assert probe_reach_per_latent(dec, audio_latents(14)) == AUDIO_CONTEXT


def test_probe_says_when_the_clip_is_too_short():
    dec = VIDEO_DECODERS["noncausal"]()  # reach 4 each way
    assert probe_reach(dec, video_latents(7)).saturated
    with pytest.raises(ValueError, match="at least 5"):
        probe_reach(dec, video_latents(4))
    with pytest.raises(ValueError, match="reach is unknown"):
        StreamingDecoder(dataclasses.replace(dec, reach=None))


def test_decoders_follow_the_causal_time_mapping():
    assert video_latents(1).dtype == torch.float64
    for name, make in VIDEO_DECODERS.items():
        dec = make()
        for n in (1, 2, 5):
            assert dec(video_latents(n)).shape[dec.out_axis] == VIDEO.frames_for_latents(n), name
    wave = make_audio(AUDIO_CONTEXT)(audio_latents(6))
    assert wave.shape[-1] == AUDIO.frames_for_latents(6) * TOY_TIME.samples_per_mel_frame


# ---------------------------------------------------------------------------------------------
# exactness


@pytest.mark.parametrize("blocks", BLOCKINGS)
@pytest.mark.parametrize("name", VIDEO_DECODERS)
def test_video_stream_equals_offline(name, blocks):
    report = stream_vs_offline(VIDEO_DECODERS[name](), video_latents(16, seed=7), blocks)
    assert report.max_abs < 1e-12, report
    assert report.chunks_exact
    assert report.length == VIDEO.frames_for_latents(16)


@pytest.mark.parametrize("blocks", BLOCKINGS)
def test_audio_stream_equals_offline(blocks):
    report = stream_vs_offline(make_audio(AUDIO_CONTEXT), audio_latents(16, seed=8), blocks)
    assert report.max_abs < 1e-12, report
    assert report.chunks_exact


def test_audio_stream_equals_offline_at_24khz():
    """The real hop: 240 samples per mel frame (24 kHz), same receptive field in latents."""
    assert DEFAULT_TIME.samples_per_mel_frame == 240
    dec = make_audio(AUDIO_CONTEXT, time=DEFAULT_TIME, factors=REAL_FACTORS)
    report = stream_vs_offline(dec, audio_latents(16, seed=8), (4, 3, 3, 3, 3))
    assert report.max_abs < 1e-12, report
    assert report.length == AUDIO.frames_for_latents(16) * 240


def test_chunks_are_final_the_moment_they_are_emitted():
    """Each chunk equals the offline decode of the WHOLE clip before any later latent is pushed."""
    d = make_noncausal()
    ctx, axes = d.reach, dict(out_axis=d.out_axis)
    z = video_latents(16, seed=9)
    offline = d(z)
    dec = StreamingDecoder(d)
    emitted = 0
    for block in split_blocks(z, (4, 3, 3, 3, 3)):
        chunk = dec.push(block)
        if chunk is None:
            continue
        assert chunk.start == emitted
        ref = offline.narrow(axes["out_axis"], chunk.start, chunk.length)
        assert (chunk.data - ref).abs().max() < 1e-12
        emitted = chunk.end
        # the hold-back is exactly `right` latents: everything before them is out
        assert emitted == VIDEO.frames_for_latents(dec.latents_seen - ctx.right)
    tail = dec.flush()
    assert tail.end == offline.shape[axes["out_axis"]]


def test_memory_is_bounded():
    d = make_noncausal()
    ctx, dec = d.reach, StreamingDecoder(d)
    for block in split_blocks(video_latents(40, seed=1), (4, 3)):
        dec.push(block)
        assert dec.held_latents <= ctx.left + 1 + ctx.right + 4


# ---------------------------------------------------------------------------------------------
# the tests can fail: a context one short of the truth breaks exactness


@pytest.mark.parametrize("name", ["noncausal"])
def test_hold_back_one_short_is_detected(name):
    d = VIDEO_DECODERS[name]()
    dec = d.with_reach(TemporalContext(d.reach.left, d.reach.right - 1))
    report = stream_vs_offline(dec, video_latents(16, seed=7), (4, 3, 3, 3, 3))
    assert report.max_abs > 1e-6 and not report.chunks_exact


def test_audio_hold_back_one_short_is_detected():
    ctx = TemporalContext(AUDIO_CONTEXT.left, AUDIO_CONTEXT.right - 1)
    report = stream_vs_offline(make_audio(ctx), audio_latents(16, seed=8), (4, 3, 3, 3, 3))
    assert report.max_abs > 1e-6


@pytest.mark.parametrize("name,short_by", [("causal", 2), ("noncausal", 2), ("causal_frame_only", 1)])
def test_left_context_short_is_detected(name, short_by):
    d = VIDEO_DECODERS[name]()
    ctx = d.reach
    # `left` one short is still exact when the decoder's first layer runs at latent rate (the sacrificial
    # latent covers it); two short always misses a dependency. Frame-rate-only decoders fail at one short.
    short = TemporalContext(ctx.left - short_by, ctx.right)
    report = stream_vs_offline(d.with_reach(short), video_latents(16, seed=7), (4, 3, 3, 3, 3))
    assert report.max_abs > 1e-6


def test_first_window_latent_decodes_to_one_frame():
    """Why the sacrificial latent: a window starting at s - left is NOT exact when frame-rate layers
    read into latent s - left; starting one earlier is."""
    decode = make_causal_frame_only()
    ctx = decode.reach
    z = video_latents(12, seed=3)
    offline = decode(z)
    s, ax = 6, decode.out_axis
    target = offline.narrow(ax, VIDEO.frames_for_latents(s), VIDEO.stride)  # frames of latent s

    def frames_of_s(w0):
        out = decode(z[:, :, w0:s + 1])
        return out.narrow(ax, VIDEO.frames_for_latents(s - w0), VIDEO.stride)

    assert (frames_of_s(s - ctx.left) - target).abs().max() > 1e-6
    assert (frames_of_s(s - ctx.left - 1) - target).abs().max() < 1e-12


def test_push_after_flush_needs_reset():
    dec = StreamingDecoder(make_causal())
    dec.push(video_latents(4))
    dec.flush()
    with pytest.raises(RuntimeError, match="reset"):
        dec.push(video_latents(3))
    dec.reset()
    assert dec.push(video_latents(3)).end == VIDEO.frames_for_latents(3)


def test_bad_out_axis_is_reported():
    dec = StreamingDecoder(dataclasses.replace(make_causal(), out_axis=2))  # frames are on axis 1
    with pytest.raises(ValueError, match="out_axis"):
        dec.push(video_latents(4))


# ---------------------------------------------------------------------------------------------
# approximate path: context too small, crossfade at seams


def test_crossfade_with_exact_context_stays_exact():
    report = stream_vs_offline(make_audio(AUDIO_CONTEXT, crossfade=30), audio_latents(16, seed=2), (4, 3, 3, 3, 3))
    assert report.max_abs < 1e-12, report


class TailVocoder(ToyVocoder):
    """ToyVocoder plus a long, exponentially decaying symmetric smoothing (a reverb-like tail): its exact
    receptive field is wide, but far latents matter little -- the case the crossfade path is for."""

    def __init__(self, *args, tail: int = 241, tau: float = 20.0, **kw):
        super().__init__(*args, **kw)
        t = (torch.arange(tail) - tail // 2).abs()
        k = torch.exp(-t / tau)
        self.kernel = (k / k.sum()).reshape(1, 1, -1).repeat(2, 1, 1)

    def __call__(self, mel):
        y = super().__call__(mel)
        pad = self.kernel.shape[-1] // 2
        return y + Fn.conv1d(Fn.pad(y, (pad, pad), mode="replicate"), self.kernel, groups=2)


TAIL_CONTEXT = TemporalContext(6, 4)  # exact: 241-sample tail = +-10 mel frames on top of the toy vocoder


def make_tail_audio(context, crossfade=0) -> Decoder:
    vae, vocoder = ToyAudioVAE(seed=4), TailVocoder(16, TOY_FACTORS, seed=5)
    return dataclasses.replace(audio_decoder(lambda z: vocoder(vae(z)), context, TOY_TIME), crossfade=crossfade)


def test_tail_vocoder_receptive_field():
    dec = make_tail_audio(TAIL_CONTEXT)
    assert probe_reach(dec, audio_latents(20)) == (TAIL_CONTEXT, False)
    assert probe_reach_per_latent(dec, audio_latents(20)) == TAIL_CONTEXT
    assert stream_vs_offline(make_tail_audio(TAIL_CONTEXT, crossfade=24), audio_latents(20, seed=2),
                             (4, 3, 3, 3, 3)).max_abs < 1e-12


def test_crossfade_reports_finite_seam_error():
    """Context smaller than the receptive field: finite error, only near seams, shrinking with the crossfade."""
    short, z, blocks = TemporalContext(4, 1), audio_latents(20, seed=2), (4, 3, 3, 3, 3)
    reports = {xf: stream_vs_offline(make_tail_audio(short, crossfade=xf), z, blocks, seam_radius=48)
               for xf in (0, 12, 48)}
    for r in reports.values():
        assert 0 < r.max_seam < 0.1 * r.peak and r.max_abs == r.max_seam  # errors live at the seams
        assert r.length == AUDIO.frames_for_latents(20) * TOY_TIME.samples_per_mel_frame
    assert reports[48].max_seam < reports[12].max_seam < reports[0].max_seam
    # more context shrinks it further
    wider = stream_vs_offline(make_tail_audio(TemporalContext(5, 2), crossfade=12), z, blocks, seam_radius=48)
    assert wider.max_seam < reports[12].max_seam
