import torch

from omniforcing_core.layout import DEFAULT_TIME
from omniforcing_core.preview import PreviewAudioDecoder, PreviewVideoDecoder


def test_preview_video_follows_the_causal_frame_rule_and_is_causal():
    dec = PreviewVideoDecoder()
    lat = torch.randn(1, 128, 4, 2, 3)
    out = dec(lat)
    assert out.shape == (1, 3, 1 + 8 * 3, 64, 96)
    assert out.min() >= 0 and out.max() <= 1
    later = lat.clone()
    later[:, :, 3] += 5
    out2 = dec(later)
    assert torch.equal(out[:, :, :17], out2[:, :, :17]) and not torch.equal(out[:, :, 17:], out2[:, :, 17:])


def test_preview_audio_length_rate_and_seamless_frames():
    dec = PreviewAudioDecoder()
    lat = torch.randn(1, 8, 26, 16)
    wav = dec(lat)
    hop = DEFAULT_TIME.samples_per_mel_frame
    assert hop == 240 and wav.shape == (1, 2, (4 * 26 - 3) * hop)
    # every partial completes whole cycles per mel frame: decoding the latents after the first as a
    # separate call (offset by 1 + 4k mel frames) gives exactly the tail of the whole decode
    tail = dec(lat[:, :, 1:])  # its first latent is treated as the 1-frame latent
    n = tail.shape[-1] - hop  # latents 2.. of the original start at mel frame 5 of the whole
    assert torch.allclose(tail[..., hop:], wav[..., 5 * hop:5 * hop + n], atol=1e-12)
