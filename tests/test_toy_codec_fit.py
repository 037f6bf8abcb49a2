"""Issue #11: the shipped toy codecs have decoders only; `VideoCodec.fit_latents` is their encoder (the
latents whose decode is closest to the pixels), what the toy VAE's encode and image -> A/V use."""
import pytest
import torch
import torch.nn.functional as F

from omniforcing_core.toy import default, world

pytestmark = pytest.mark.skipif(not default.has_trained_assets(), reason="the toy assets are not shipped here")


@pytest.fixture(scope="module")
def codec():
    return default.load_text_and_codecs()[1].video


@pytest.fixture(scope="module")
def clip_video():
    return world.make_clip(3, seconds=1.0).video[None]  # [1, 3, 25, 128, 128]


def _objective(codec, z, target, prior):
    """The fit's objective computed independently: autograd through the codec's own decoder (unclamped),
    on the frames decode() keeps."""
    s = codec.stride
    raw = codec.dec((z * codec.latent_std.view(1, -1, 1, 1, 1) + codec.latent_mean.view(1, -1, 1, 1, 1))
                    .permute(0, 2, 3, 4, 1))
    b, n, hh, ww, _ = raw.shape
    p = codec.patch
    x = raw.view(b, n, hh, ww, 3, s, p, p).permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, 3, n * s, hh * p, ww * p)
    x = (x[:, :, s - 1:] + 1) / 2
    return 4 * ((x - target) ** 2).sum() + prior * (z ** 2).sum()  # residuals in [-1, 1] units: 2x


def test_fit_reaches_the_minimum_an_independent_optimiser_finds(codec, clip_video):
    """Levenberg-Marquardt with the hand-written Jacobian vs autograd + L-BFGS run to convergence."""
    video = clip_video[:, :, :9]  # 2 latents: 32 small fits
    pooled = F.avg_pool3d(video, (1, codec.pool, codec.pool))
    z = codec.fit_latents(video, prior=1e-2)
    assert z.shape == (1, 128, 2, 4, 4)
    with torch.enable_grad():
        ref = torch.zeros_like(z).requires_grad_(True)
        opt = torch.optim.LBFGS([ref], max_iter=150, history_size=30, tolerance_grad=1e-9, tolerance_change=1e-12,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            f = _objective(codec, ref, pooled, 1e-2)
            f.backward()
            return f
        opt.step(closure)
    best = float(_objective(codec, ref.detach(), pooled, 1e-2))
    start = float(_objective(codec, torch.zeros_like(z), pooled, 1e-2))
    got = float(_objective(codec, z, pooled, 1e-2))
    print(f"fit {got:.2f}, L-BFGS {best:.2f}, start {start:.2f}")
    assert got < 1.02 * best and best < 0.5 * start, (got, best, start)


def test_fit_reconstructs_a_world_clip_at_latent_scale(codec, clip_video):
    z = codec.fit_latents(clip_video)
    rec = codec.decode(z)
    assert rec.shape == clip_video.shape
    bg = clip_video[:, :, :, :2, :2].mean((3, 4), keepdim=True)  # the corner is background
    dev = (clip_video - bg).abs().sum(1)
    objects = dev > 0.3
    err = (rec - clip_video).abs().sum(1)
    assert objects.float().mean() > 0.01
    # objects come back (the toy codec blurs their edges), and the background stays background
    assert float(err[objects].mean()) < 0.4 * float(dev[objects].mean())
    assert float(err[~objects].mean()) < 0.1  # RGB summed: ~0.02 a channel
    assert 0.5 < float(z.std()) < 1.5  # about the unit scale the student was trained on


def test_decode_of_a_fit_of_a_decode_is_the_same_picture(codec, clip_video):
    """decode o fit is (nearly) a projection: pictures the decoder can make come back unchanged."""
    x = codec.decode(codec.fit_latents(clip_video), full_res=False)
    pooled = F.avg_pool3d(clip_video, (1, codec.pool, codec.pool))
    again = codec.decode(codec.fit_latents(x, pooled=True), full_res=False)
    assert float(((again - x) ** 2).mean()) < 0.05 * float(((x - pooled) ** 2).mean())


def test_a_single_frame_fits_to_one_latent(codec, clip_video):
    z = codec.fit_latents(clip_video[:, :, :1])
    assert z.shape == (1, 128, 1, 4, 4)
    full = codec.fit_latents(clip_video)
    # latent 0 holds frame 0 alone, so it is the same whatever follows
    assert float((z[:, :, 0] - full[:, :, 0]).abs().max()) < 1e-4
