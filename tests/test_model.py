import pytest
import torch

from omniforcing_core.config import LTX2_19B, TINY
from omniforcing_core.embedded import random_model
from omniforcing_core.layout import make_clip, make_layout
from omniforcing_core.model import OmniForcingTransformer
from omniforcing_core.rope import RopeConfig


def test_ltx2_19b_keys_and_parameter_count_on_meta():
    with torch.device("meta"):
        m = OmniForcingTransformer(LTX2_19B)
    sd = m.state_dict()
    assert len(sd) == 3510
    assert sum(v.numel() for v in sd.values()) == 18_876_174_592
    assert sum(1 for k in sd if k.startswith("transformer_blocks.7.")) == 72
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["transformer_blocks.0.audio_to_video_attn.to_q.weight"] == (2048, 4096)
    assert shapes["transformer_blocks.0.video_to_audio_attn.to_k.weight"] == (2048, 4096)
    assert shapes["transformer_blocks.0.scale_shift_table_a2v_ca_video"] == (5, 4096)
    assert shapes["av_ca_a2v_gate_adaln_single.linear.weight"] == (4096, 4096)
    assert shapes["adaln_single.linear.weight"] == (24576, 4096)
    assert shapes["audio_caption_projection.linear_1.weight"] == (2048, 3840)


def _run_kv_vs_masked(model, layout, clip, text, sigma=0.7):
    """Every block via the KV cache (history refreshed clean at sigma 0) vs the same block of one
    masked full-sequence forward (history clean at 0, block noisy, later blocks at other noise)."""
    g = torch.Generator().manual_seed(5)
    dt = model.dtype
    v = torch.randn(clip.video_shape(), generator=g).to(dt)
    a = torch.randn(clip.audio_shape(), generator=g).to(dt)
    cache = model.new_cache(layout, clip.grid)
    worst_abs, worst_rel = 0.0, 0.0
    for b in clip.blocks():
        ropes = model.prepare_block(cache, b, clip.grid)
        vb, ab = v[:, :, b.video_start:b.video_end], a[:, :, b.audio_start:b.audio_end]
        kv_v, kv_a = model.forward_block(vb, ab, sigma, sigma, text, cache, ropes)
        sv = torch.zeros(1, clip.video_latents)
        sv[:, b.video_start:b.video_end] = sigma
        sv[:, b.video_end:] = 0.3
        sa = torch.zeros(1, clip.audio_latents)
        sa[:, b.audio_start:b.audio_end] = sigma
        sa[:, b.audio_end:] = 0.9
        fv, fa = model(v, a, sv, sa, text, layout)
        fv, fa = fv[:, :, b.video_start:b.video_end], fa[:, :, b.audio_start:b.audio_end]
        for x, y in ((kv_v, fv), (kv_a, fa)):
            d = (x.double() - y.double()).abs().max().item()
            worst_abs = max(worst_abs, d)
            worst_rel = max(worst_rel, d / y.double().abs().max().item())
        model.forward_block(vb, ab, 0.0, 0.0, text, cache, ropes)  # clean refresh of this block
    return worst_abs, worst_rel


CASES = [("v2", 0, "interleaved"), ("v2", 0, "split"), ("prefix", 0, "interleaved"), ("prefix", 4, "interleaved"),
         ("prefix", 4, "split")]


@pytest.mark.parametrize("kind,sinks,rope", CASES)
def test_kv_cache_block_forward_equals_masked_full_forward_fp64(kind, sinks, rope):
    cfg = TINY.replace(num_audio_sinks=sinks, rope=RopeConfig(rope, "float64"))
    model = random_model(cfg, dtype=torch.float64)
    lay = make_layout(kind, num_sinks=sinks)
    clip = make_clip(lay, 64, 96, seconds=3)
    ctx = torch.randn(1, 5, cfg.caption_channels, dtype=torch.float64)
    text = model.text_kv(ctx, ctx.flip(1))
    worst, _ = _run_kv_vs_masked(model, lay, clip, text)
    assert worst < 1e-10


@pytest.mark.parametrize("kind,sinks,rope", CASES[:4])
def test_kv_cache_block_forward_equals_masked_full_forward_fp32(kind, sinks, rope):
    cfg = TINY.replace(num_audio_sinks=sinks, rope=RopeConfig(rope, "float32"))
    model = random_model(cfg, dtype=torch.float32)
    lay = make_layout(kind, num_sinks=sinks)
    clip = make_clip(lay, 64, 96, seconds=3)
    ctx = torch.randn(1, 5, cfg.caption_channels)
    text = model.text_kv(ctx, ctx)
    _, rel = _run_kv_vs_masked(model, lay, clip, text)
    assert rel < 1e-4


def test_masked_forward_has_no_future_leakage_and_masks_matter(tiny64, text64):
    lay = make_layout("v2")
    clip = make_clip(lay, 64, 64, seconds=3)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(clip.video_shape(), generator=g, dtype=torch.float64)
    a = torch.randn(clip.audio_shape(), generator=g, dtype=torch.float64)
    b1 = lay.block(1)
    v2, a2 = v.clone(), a.clone()
    v2[:, :, b1.video_end:] += 1.0  # change only block 2 of both streams
    a2[:, :, b1.audio_end:] -= 1.0
    for layout, same in ((lay, True), (None, False)):
        ov, oa = tiny64(v, a, 0.5, 0.5, text64, layout)
        pv, pa = tiny64(v2, a2, 0.5, 0.5, text64, layout)
        d = max((ov[:, :, :b1.video_end] - pv[:, :, :b1.video_end]).abs().max().item(),
                (oa[:, :, :b1.audio_end] - pa[:, :, :b1.audio_end]).abs().max().item())
        assert (d == 0.0) if same else (d > 1e-3)


def test_per_frame_timesteps_change_only_their_frames_adaln(tiny64, text64):
    clip = make_clip(make_layout("v2"), 64, 64, seconds=1)
    v = torch.randn(clip.video_shape(), dtype=torch.float64)
    a = torch.randn(clip.audio_shape(), dtype=torch.float64)
    base = tiny64(v, a, torch.full((1, 4), 0.5), torch.full((1, 26), 0.5), text64, None)
    scalar = tiny64(v, a, torch.tensor([0.5]), 0.5, text64, None)
    assert torch.equal(base[0], scalar[0]) and torch.equal(base[1], scalar[1])
    sv = torch.full((1, 4), 0.5)
    sv[0, 3] = 0.9
    other = tiny64(v, a, sv, 0.5, text64, None)
    assert not torch.allclose(other[0], base[0])


def test_operations_namespace_is_used_for_every_weight_layer():
    made = []

    class Ops:
        class Linear(torch.nn.Linear):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append("linear")

        class RMSNorm(torch.nn.RMSNorm):
            def __init__(self, *a, **k):
                super().__init__(*a, **k)
                made.append("rms")

    m = OmniForcingTransformer(TINY, operations=Ops)
    n_linear = sum(1 for x in m.modules() if isinstance(x, torch.nn.Linear))
    n_rms = sum(1 for x in m.modules() if isinstance(x, torch.nn.RMSNorm))
    assert made.count("linear") == n_linear and made.count("rms") == n_rms and n_linear > 0


def test_forward_makes_no_host_syncs(monkeypatch, tiny64, text64):
    lay = make_layout("v2")
    clip = make_clip(lay, 64, 64, seconds=2)
    v = torch.randn(clip.video_shape(), dtype=torch.float64)
    a = torch.randn(clip.audio_shape(), dtype=torch.float64)
    cache = tiny64.new_cache(lay, clip.grid)
    ropes = tiny64.prepare_block(cache, lay.block(0), clip.grid)

    def boom(*_a, **_k):
        raise AssertionError("host sync inside forward")

    for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    tiny64.forward_block(v[:, :, :4], a[:, :, :26], 0.5, 0.5, text64, cache, ropes)
    tiny64(v, a, 0.5, 0.5, text64, lay)
    monkeypatch.undo()


def test_sink_tokens_are_parameters_and_strip_from_output():
    cfg = TINY.replace(num_audio_sinks=3)
    m = random_model(cfg, dtype=torch.float64)
    assert tuple(m.audio_sink_tokens.shape) == (1, 3, cfg.audio_dim)
    lay = make_layout("prefix", num_sinks=3)
    clip = make_clip(lay, 64, 64, seconds=1)
    ctx = torch.randn(1, 4, cfg.caption_channels, dtype=torch.float64)
    out = m(torch.randn(clip.video_shape(), dtype=torch.float64), torch.randn(clip.audio_shape(), dtype=torch.float64),
            0.5, 0.5, m.text_kv(ctx, ctx), lay)
    assert out[1].shape == clip.audio_shape()
    with pytest.raises(ValueError, match="sink"):
        m.new_cache(make_layout("v2"), clip.grid)


def test_text_connectors_fill_registers_and_ignore_left_padding():
    from omniforcing_core.config import TINY_WITH_CONNECTORS
    m = random_model(TINY_WITH_CONNECTORS, dtype=torch.float64)
    feats = torch.randn(1, 5, TINY_WITH_CONNECTORS.caption_channels, dtype=torch.float64)
    v, a = m.encode_text(feats)
    assert v.shape == (1, 1024, 24) and a.shape == (1, 1024, 24)
    assert not torch.allclose(v, a)  # two connectors, two sets of weights
    padded = torch.cat([torch.zeros(1, 3, 24, dtype=torch.float64), feats], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    v2, _ = m.encode_text(padded, mask)
    assert (v2 - v).abs().max().item() < 1e-12
    # positions past the prompt are the registers' business: changing the prompt changes them only through attention
    regs_only = m.video_embeddings_connector._with_registers(feats, None)
    assert torch.equal(regs_only[0, 5:8], m.video_embeddings_connector.learnable_registers[5:8])
    assert torch.equal(regs_only[0, 8 + 5], m.video_embeddings_connector.learnable_registers[5])
    text = m.text_kv(v, a)
    assert text.video[0][0].shape == (1, 1024, TINY_WITH_CONNECTORS.video_dim)


def test_adopt_modules_shares_weights_without_copying():
    import importlib.util
    from pathlib import Path
    # nodes/sharing.py is plain torch; load the file alone (the nodes package itself imports ComfyUI)
    path = Path(__file__).resolve().parents[1] / "nodes" / "sharing.py"
    spec = importlib.util.spec_from_file_location("omniforcing_nodes_sharing", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    adopt_modules = mod.adopt_modules
    host = random_model(TINY, seed=3)
    with torch.device("meta"):
        ours = OmniForcingTransformer(TINY)
    adopt_modules(ours, host)
    assert ours.transformer_blocks[1].attn1.to_q is host.transformer_blocks[1].attn1.to_q
    assert ours.scale_shift_table is host.scale_shift_table
    assert ours.transformer_blocks[0].scale_shift_table_a2v_ca_audio is \
        host.transformer_blocks[0].scale_shift_table_a2v_ca_audio
    assert all(p.device.type == "cpu" for p in ours.parameters())
    # a change to the host (a LoRA patch applied in place) is seen by ours
    with torch.no_grad():
        host.transformer_blocks[0].ff.net[2].weight.add_(1.0)
    assert torch.equal(ours.transformer_blocks[0].ff.net[2].weight, host.transformer_blocks[0].ff.net[2].weight)
    clip = make_clip(make_layout("v2"), 32, 32, seconds=1)
    v, a = torch.randn(clip.video_shape()), torch.randn(clip.audio_shape())
    ctx = torch.randn(1, 3, TINY.caption_channels)
    assert torch.equal(ours(v, a, 0.5, 0.5, ours.text_kv(ctx, ctx), None)[0],
                       host(v, a, 0.5, 0.5, host.text_kv(ctx, ctx), None)[0])


def test_runtime_attention_kernel_is_the_one_used(tiny64, text64):
    """The runtime (not the weights) decides the kernel: every attention of both paths goes through it."""
    from omniforcing_core.layers import sdpa_attention
    from omniforcing_core.model import Runtime
    calls = []

    def counting(q, k, v, heads, mask=None):
        calls.append(q.shape[1])
        return sdpa_attention(q, k, v, heads, mask)
    clip = make_clip(make_layout("v2"), 32, 32, seconds=1)
    v = torch.randn(clip.video_shape(), dtype=torch.float64)
    a = torch.randn(clip.audio_shape(), dtype=torch.float64)
    want = tiny64(v, a, 0.5, 0.5, text64, make_layout("v2"))
    got = tiny64(v, a, 0.5, 0.5, text64, make_layout("v2"), runtime=Runtime(attn_fn=counting))
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    assert len(calls) == 6 * tiny64.config.num_layers  # self x2, text x2, cross-modal x2 per layer
    scaled = tiny64(v, a, 0.5, 0.5, text64, make_layout("v2"),
                    runtime=Runtime(attn_fn=lambda q, k, v_, h, m=None: 0 * sdpa_attention(q, k, v_, h, m)))
    assert not torch.allclose(want[0], scaled[0])  # negative control: the kernel's output reaches the result


def test_modality_runner_on_streams_matches_sequential_when_cuda_is_present():
    import pytest as _pytest
    if not torch.cuda.is_available():
        _pytest.skip("needs a CUDA device")
    m = random_model(TINY, dtype=torch.float32, device="cuda")
    clip = make_clip(make_layout("v2"), 64, 64, seconds=2)
    v = torch.randn(clip.video_shape(), device="cuda")
    a = torch.randn(clip.audio_shape(), device="cuda")
    ctx = torch.randn(1, 4, TINY.caption_channels, device="cuda")
    t = m.text_kv(ctx, ctx)
    want = m(v, a, 0.5, 0.5, t, make_layout("v2"))
    from omniforcing_core.model import Runtime
    got = m(v, a, 0.5, 0.5, t, make_layout("v2"), runtime=Runtime(parallel_modalities=True))
    assert torch.allclose(want[0], got[0], atol=1e-5) and torch.allclose(want[1], got[1], atol=1e-5)
