"""Issue 11 item 5: the toy decoder's audio and every file written from it stay within full scale."""
import numpy as np
import pytest
import torch

from omniforcing_core.toy.codecs import CEILING, KNEE, soft_limit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_soft_limit_is_identity_below_the_knee_and_never_reaches_the_ceiling():
    x = torch.linspace(-20, 20, 40001, dtype=torch.float64)
    y = soft_limit(x)
    assert y.abs().max() <= CEILING  # reached only where tanh rounds to 1
    small = x.abs() <= KNEE
    assert torch.equal(y[small], x[small])
    assert (y[1:] >= y[:-1]).all()  # monotonic: no folding
    d = torch.diff(y) / torch.diff(x)
    assert (d - 1).abs()[(x[1:].abs() - KNEE).abs() < 1e-3].max() < 1e-2  # no kink at the knee
    hard = x.clamp(-1, 1)
    assert (hard.abs() >= 1).float().mean() > 0.9  # negative control: clipping sits on the rail


def test_toy_audio_peaks_stay_below_full_scale_over_many_prompts(tmp_path):
    """The trained toy student on 16 prompts: the decoded audio peaks below the limiter's ceiling and
    the AAC in the written MP4, decoded back, below full scale."""
    from omniforcing_core.layout import make_clip
    from omniforcing_core.live import LiveWriter
    from omniforcing_core.media import decode_audio as decode_audio_file
    from omniforcing_core.sampling import stream
    from omniforcing_core.streaming import decode_plan, run_stream
    from omniforcing_core.toy.default import load_default
    from omniforcing_core.toy.world import make_clip as world_clip

    d = load_default()
    if not d.trained:
        pytest.skip("no shipped toy assets")
    peaks, files = [], []
    for i in range(16):
        caption = world_clip(9000 + i, 2.0, 128).caption
        clip = make_clip(d.layout, d.size, d.size, seconds=2, seed=i)
        t = clip.layout.time
        with torch.no_grad():
            if i < 4:  # a few through the live writer, the rest decoded directly
                w = LiveWriter(tmp_path / f"s{i}", t.fps, t.audio_sample_rate, d.size, d.size)
                run = run_stream(stream(d.model, clip, d.text(caption)), decode_plan("exact", d.decoders(t), t), w)
                files.append(w.summary().paths.mp4)
                wave = run.audio()
            else:
                v, a = [], []
                for r in stream(d.model, clip, d.text(caption)):
                    a.append(r.audio)
                wave = d.decode_audio(torch.cat(a, 2))
        peaks.append(float(wave.abs().max()))
    assert max(peaks) <= CEILING + 1e-6 and np.mean(peaks) > 0.05  # loud enough to hear, never past the ceiling
    for f in files:
        pcm = decode_audio_file(f)
        assert float(np.abs(pcm).max()) <= 1.0, f
