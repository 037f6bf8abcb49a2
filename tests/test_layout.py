import pytest

from omniforcing_core.layout import LayoutError, make_clip, make_layout


def test_v2_block_table_matches_released_checkpoint():
    lay = make_layout("v2")
    got = [(b.video_start, b.video_end, b.audio_start, b.audio_end, b.t_start, b.t_end)
           for b in lay.iter_blocks(5)]
    assert got == [(0, 4, 0, 26, 0.0, 1.0), (4, 7, 26, 51, 1.0, 2.0), (7, 10, 51, 76, 2.0, 3.0),
                   (10, 13, 76, 101, 3.0, 4.0), (13, 16, 101, 126, 4.0, 5.0)]
    clip = make_clip(lay, 512, 768, seconds=5)
    assert clip.video_shape() == (1, 128, 16, 16, 24)
    assert clip.audio_shape() == (1, 8, 126, 16)
    assert clip.num_frames == 121 and clip.tokens_per_latent == 384


def test_prefix_layout_block0_is_first_latents_plus_sinks():
    lay = make_layout("prefix", num_sinks=16)
    b0, b1 = lay.block(0), lay.block(1)
    assert (b0.video_start, b0.video_end, b0.audio_start, b0.audio_end, b0.sinks) == (0, 1, 0, 1, 16)
    assert (b1.video_start, b1.video_end, b1.audio_start, b1.audio_end, b1.sinks) == (1, 4, 1, 26, 0)
    clip = make_clip(lay, 512, 768, seconds=5)
    assert clip.num_blocks == 6 and clip.video_latents == 16 and clip.audio_latents == 126


@pytest.mark.parametrize("kind", ["v2", "prefix"])
@pytest.mark.parametrize("seconds", [1, 2, 5, 13])
def test_every_latent_in_exactly_one_block_and_blocks_cover_whole_seconds(kind, seconds):
    lay = make_layout(kind)
    clip = make_clip(lay, 64, 96, seconds=seconds)
    vcount = [0] * clip.video_latents
    acount = [0] * clip.audio_latents
    for b in clip.blocks():
        for f in range(b.video_start, b.video_end):
            vcount[f] += 1
            assert lay.video_block_of(f) == b.index
        for a in range(b.audio_start, b.audio_end):
            acount[a] += 1
            assert lay.audio_block_of(a) == b.index
        assert abs(b.t_end - round(b.t_end)) < 1e-12
    assert set(vcount) == {1} and set(acount) == {1}
    assert clip.seconds == seconds
    # the video clock and the audio clock agree on the length
    t = lay.time
    assert t.video.frames_for_latents(clip.video_latents) - 1 == seconds * t.fps
    assert t.audio.frames_for_latents(clip.audio_latents) - 1 == seconds * t.mel_rate


def test_any_resolution_gives_tokens_per_latent_from_size():
    clip = make_clip(make_layout("v2"), 320, 480, seconds=2)
    assert clip.tokens_per_latent == 10 * 15


@pytest.mark.parametrize("kw, needle", [
    (dict(height=500, width=768, seconds=5), "nearest valid height is 512"),
    (dict(height=512, width=770, seconds=5), "nearest valid width is 768"),
    (dict(height=130, width=100, seconds=5), "width=100 .* nearest valid width is 96; height=130 .* nearest valid height is 128"),
    (dict(height=512, width=768, num_frames=120), "nearest valid frame count is 121"),
    (dict(height=512, width=768, num_frames=129), "nearest valid: 16 latents = 121 frames"),
    (dict(height=512, width=768, seconds=0), "nearest valid is 1"),
    (dict(height=512, width=768, seconds=2.5), "nearest valid is"),
    (dict(height=512, width=768, num_frames=0), "length must be positive"),
    (dict(height=0, width=768, seconds=1), "height=0"),
])
def test_impossible_sizes_name_the_nearest_valid_value(kw, needle):
    h, w = kw.pop("height"), kw.pop("width")
    with pytest.raises(LayoutError, match=needle):
        make_clip(make_layout("v2"), h, w, **kw)


def test_layout_errors():
    with pytest.raises(LayoutError, match="no sink tokens"):
        make_layout("v2", num_sinks=4)
    with pytest.raises(LayoutError, match="valid layouts"):
        make_layout("v3")
