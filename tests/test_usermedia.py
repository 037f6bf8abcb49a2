"""The user's media on the stream's clock: the length rule, frame-rate / size / sample-rate conforming
(held against independent computations), and files read back through ffmpeg."""
import math
import subprocess
from fractions import Fraction

import numpy as np
import pytest
import torch

from omniforcing_core.layout import DEFAULT_TIME
from omniforcing_core.media import ffmpeg_exe, write_mp4
from omniforcing_core.sampling import GivenError
from omniforcing_core.usermedia import (conform_audio, conform_frames, fit_length, read_audio, read_video,
                                        stream_seconds)

T = DEFAULT_TIME  # 24 fps, 24 kHz


def test_length_rule_whole_seconds_padding_up_to_one_frame_and_clear_errors():
    assert stream_seconds(2.0, None, T, "x") == 2 and stream_seconds(2.97, None, T, "x") == 3  # 30 ms short: padded
    assert stream_seconds(2.9, None, T, "x") == 2 and stream_seconds(7.5, 3, T, "x") == 3
    assert stream_seconds(2.97, 3, T, "x") == 3
    with pytest.raises(GivenError, match=r"--audio a.wav is 2.90 s long, shorter than the 3 s asked: ask for at most 2 s"):
        stream_seconds(2.9, 3, T, "--audio a.wav")
    with pytest.raises(GivenError, match="0.50 s long; a stream needs at least 1 s"):
        stream_seconds(0.5, None, T, "x")
    with pytest.raises(GivenError, match="a stream needs at least 1 s, or give a longer one"):
        stream_seconds(0.5, 2, T, "x")


def test_fit_length_cuts_holds_the_last_frame_or_pads_silence():
    x = torch.arange(6.0).view(1, 6)
    assert torch.equal(fit_length(x, 4, -1, False), x[:, :4])
    assert torch.equal(fit_length(x, 8, -1, False), torch.tensor([[0, 1, 2, 3, 4, 5, 0, 0.0]]))
    f = torch.rand(3, 2, 2, 3)
    held = fit_length(f, 5, 0, True)
    assert held.shape == (5, 2, 2, 3) and torch.equal(held[3], f[2]) and torch.equal(held[4], f[2])


def test_frames_at_another_rate_show_the_frame_on_screen_at_each_stream_time():
    n, fps = 45, 30.0  # 1.5 s at 30 fps
    frames = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 8, 8, 3) / 255
    out = conform_frames(frames, fps, T, 32, 32)
    want = [max(i for i in range(n) if Fraction(i, 30) <= Fraction(j, 24)) for j in range(36)]  # on screen at j/24
    assert out.shape == (36, 32, 32, 3)
    assert [round(float(out[j, 0, 0, 0]) * 255) for j in range(36)] == want
    same = conform_frames(frames, 24.0, T, 8, 8)  # same rate and size: untouched
    assert torch.equal(same, frames)


def test_frames_are_scaled_to_cover_and_centre_cropped_not_stretched():
    h, w = 96, 160  # 5:3 into 64x64: scale 2/3 -> 64 x 106.7, 21 columns cut on each side
    ramp = ((torch.arange(w, dtype=torch.float32) + 0.5) / w).view(1, 1, w, 1).expand(1, h, w, 3)
    out = conform_frames(ramp, 24.0, T, 64, 64)[0, 32, :, 0]
    scale = 64 / 96
    sw = round(w * scale)
    left = (sw - 64) // 2
    # output column u samples input position x = (u + left + 0.5) * w / sw, where the ramp is x / w
    want = torch.tensor([(u + left + 0.5) / sw for u in range(64)])
    assert (out[2:-2] - want[2:-2]).abs().max().item() < 2e-3
    stretched = torch.tensor([(u + 0.5) / 64 for u in range(64)])  # what a plain resize would give
    assert (out - stretched).abs().max().item() > 0.05


def test_audio_is_resampled_and_its_channels_fitted():
    rate, f0 = 44100, 1000.0
    t = torch.arange(rate, dtype=torch.float64) / rate
    stereo = torch.stack([torch.sin(2 * math.pi * f0 * t), 0.5 * torch.sin(2 * math.pi * f0 * t)]).float()
    out = conform_audio(stereo, rate, T, channels=2)
    ref = torch.sin(2 * math.pi * f0 * torch.arange(24000, dtype=torch.float64) / 24000).float()
    assert out.shape == (2, 24000)
    assert (out[0, 200:-200] - ref[200:-200]).abs().max().item() < 1e-2
    assert (out[1, 200:-200] - 0.5 * ref[200:-200]).abs().max().item() < 1e-2
    mono = conform_audio(stereo[0], 24000, T, channels=2)
    assert torch.equal(mono[0], stereo[0]) and torch.equal(mono[1], stereo[0])  # widened, not resampled
    three = conform_audio(torch.stack([stereo[0], stereo[0], -stereo[0]]), 24000, T, channels=2)
    assert torch.allclose(three[0], stereo[0] / 3, atol=1e-6)  # more channels: averaged down
    with pytest.raises(GivenError, match=r"must be \[channels, samples\]"):
        conform_audio(torch.zeros(2, 0), 24000, T)


def test_files_are_read_on_the_stream_clock(tmp_path):
    # audio: 1.5 s of a 440 Hz tone as 48 kHz mono WAV -> 24 kHz stereo
    t = np.arange(72000) / 48000
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    wav = tmp_path / "tone.wav"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "f32le", "-ar", "48000", "-ac", "1", "-i",
                    "pipe:0", str(wav)], input=tone.tobytes(), check=True)
    a = read_audio(wav, T)
    ref = 0.5 * np.sin(2 * np.pi * 440 * np.arange(36000) / 24000)
    assert a.shape == (2, 36000) and np.abs(a[0, 100:-100].numpy() - ref[100:-100]).max() < 1e-2
    assert read_audio(wav, T, seconds=1.0).shape[1] < 36000  # only what the stream can use is read
    # video: 2 s at 24 fps, 64x96 -> 32x32 (cover + crop); brightness steps once a second
    frames = np.zeros((48, 64, 96, 3), np.uint8)
    frames[24:] = 200
    mp4 = tmp_path / "v.mp4"
    write_mp4(mp4, frames, 24, None)
    v = read_video(mp4, T, 32, 32)
    assert v.shape == (48, 32, 32, 3)
    level = v.mean((1, 2, 3)) * 255
    assert level[:24].max() < 10 and level[24:].min() > 190  # each frame where it was
