"""Issue #6: the synthetic audio-visual world, the tiny codecs and the caption encoder."""
import pytest
import torch

from omniforcing_core.toy import world
from omniforcing_core.toy.codecs import AudioCodec, Codecs, MelFrontEnd, VideoCodec, mel_bin_of
from omniforcing_core.toy.report import analyse, sound_onsets
from omniforcing_core.toy.textenc import TextEncoder

pytestmark = pytest.mark.usefixtures("one_thread")



def test_clip_is_deterministic_and_has_ltx2_lengths():
    a, b = world.make_clip(11, seconds=2, size=64), world.make_clip(11, seconds=2, size=64)
    assert torch.equal(a.video, b.video) and torch.equal(a.audio, b.audio) and a.caption == b.caption
    assert a.video.shape == (3, 49, 64, 64)  # 1 + 24 s frames
    assert a.audio.shape == (32000,)  # 16 kHz
    c = world.make_clip(12, seconds=2, size=64)  # another seed: another world, in every modality
    assert not torch.equal(c.video, a.video) and not torch.equal(c.audio, a.audio)
    assert [e.time for e in c.events] != [e.time for e in a.events]


def test_events_are_exact_and_audible_at_their_time():
    for seed in range(6):
        c = world.make_clip(seed, size=64)
        assert c.events, "every clip has at least one contact"
        assert all(0 <= e.time < 2 for e in c.events)
        for e in c.events:  # the tone starts at the event sample, silence just before (if no other tone)
            s = int(round(e.time * world.SAMPLE_RATE))
            assert c.audio[s:s + 160].abs().max() > 0.05
        cols = {o.colour for o in c.objects}
        assert all(col in c.caption for col in cols)


def test_caption_counts_events():
    c = world.make_clip(3, size=64)
    for i, o in enumerate(c.objects):
        n = sum(1 for e in c.events if e.obj == i)
        if o.motion == "bounces" and n in world.COUNT_WORDS:
            assert f"{o.colour} {o.shape} bounces {world.COUNT_WORDS[n]}" in c.caption


def test_detectors_recover_ground_truth_events():
    fe = MelFrontEnd()
    c = world.make_clip(7_000_003)
    r = analyse(torch.nn.functional.avg_pool3d(c.video, (1, 4, 4)), fe(c.audio[None])[0], c.caption)
    assert r["n_visual"] >= 1 and r["n_matched"] == r["n_visual"]
    assert all(abs(o) < 0.2 for o in r["offsets"])
    on = sound_onsets(fe(c.audio[None])[0])
    for e in c.events:
        assert any(abs(t - e.time) < 0.05 for t in on[e.colour])


def test_codec_shapes_follow_ltx2_time_base():
    torch.manual_seed(0)
    vc, ac = VideoCodec(), AudioCodec()
    v = torch.rand(2, 3, 49, 128, 96)
    z = vc.encode(v)
    assert z.shape == (2, 128, 7, 4, 3)  # 1 + 48/8 latents, /32 in space
    assert vc.decode(z).shape == (2, 3, 49, 128, 96)
    wav = torch.randn(2, 32000) * 0.1
    mel = ac.front(wav)
    assert mel.shape == (2, 64, 201)  # 100 mel frames/s
    za = ac.encode(wav)
    assert za.shape == (2, 8, 51, 16)  # 25 latents/s, 8 x 16
    assert ac.decode_mel(za).shape == (2, 64, 201)
    assert Codecs().decode_audio(za, 24000).shape == (2, 48000)


def test_codecs_are_causal_first_latent_alone():
    torch.manual_seed(0)
    vc, ac = VideoCodec(), AudioCodec()
    v = torch.rand(1, 3, 17, 64, 64)
    v2 = v.clone()
    v2[:, :, 1:] = torch.rand_like(v2[:, :, 1:])
    assert torch.equal(vc.encode(v)[:, :, 0], vc.encode(v2)[:, :, 0])  # latent 0 sees only frame 0
    mel = torch.randn(1, 64, 9)
    mel2 = mel.clone()
    mel2[:, :, 1:] += 1
    assert torch.equal(ac.encode_mel(mel)[:, :, 0], ac.encode_mel(mel2)[:, :, 0])
    # latent j of the video decoder depends on latent j only: decoding streams block by block
    z = vc.encode(v)
    full = vc.decode(z, full_res=False)
    part = vc.decode(z[:, :, 1:], full_res=False)
    assert torch.allclose(full[:, :, -8:], part[:, :, -8:], atol=1e-6)


def test_pitch_bins_are_distinct():
    bins = [mel_bin_of(p) for _, p in world.COLOURS.values()]
    assert len(set(bins)) == len(bins) and min(b2 - b1 for b1, b2 in zip(sorted(bins), sorted(bins)[1:])) >= 3


def test_text_encoder_shapes_and_vocabulary():
    te = TextEncoder(32)
    f = te(["a red ball bounces twice, a blue square slides", ""])
    assert f.shape == (2, 20, 32)
    ids = te.tokenize(["a red ball bounces twice"])
    assert (ids[0, :5] > 1).all() and (ids[0, 5:] == 0).all()  # known words, then padding
    assert te.tokenize(["a purple ball"])[0, 1] == 1  # unknown word
