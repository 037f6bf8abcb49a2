import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omniforcing_core.checkpoint import CheckpointError, save_safetensors, scan
from omniforcing_core.config import TINY
from omniforcing_core.embedded import random_model
from omniforcing_core.loader import header_for, load_model
from omniforcing_core.rope import RopeConfig

ROOT = Path(__file__).resolve().parents[1]
FOREIGN = {"vae.decoder.conv_in.weight": torch.randn(4, 3), "audio_vae.decoder.x": torch.randn(2),
           "vocoder.conv_pre.weight": torch.randn(3, 3), "text_embedding_projection.aggregate_embed.weight":
           torch.randn(2, 2)}


def _meta(cfg):
    return {"config": json.dumps({"transformer": header_for(cfg)})}


def _write(model, path, prefix="", shards=1, foreign=True, meta=True):
    sd = dict(model.state_dict())
    out = save_safetensors(sd, path, prefix=prefix, shards=shards, metadata=_meta(model.config) if meta else None)
    if foreign:
        save_safetensors(FOREIGN, Path(str(out) + ".extra.safetensors") if shards <= 1 else
                         out.parent / "zz-extra.safetensors")
    return out


def _equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("prefix", ["", "model.", "model.diffusion_model.", "model.velocity_model."])
@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip_is_bit_exact_for_every_prefix_single_and_sharded(tmp_path, prefix, shards):
    m = random_model(TINY, seed=1)
    src = _write(m, tmp_path / "ckpt.safetensors" if shards == 1 else tmp_path / "ckpt", prefix, shards, foreign=False)
    if shards == 1:  # foreign tensors in the same file are set aside
        sd = {prefix + k: v for k, v in m.state_dict().items()} | FOREIGN
        save_safetensors(sd, src, metadata=_meta(m.config))
    loaded, rep = load_model(src)
    assert _equal(m, loaded)
    assert rep.base_prefix == prefix and rep.num_tensors == len(m.state_dict())
    if shards == 1:
        assert rep.ignored == len(FOREIGN)
    if shards > 1:  # the folder form finds the index
        loaded2, _ = load_model(src.parent)
        assert _equal(m, loaded2)


def test_folder_of_plain_shards_without_index(tmp_path):
    m = random_model(TINY, seed=2)
    sd = m.state_dict()
    keys = list(sd)
    save_safetensors({k: sd[k] for k in keys[:50]}, tmp_path / "a.safetensors", metadata=_meta(m.config))
    save_safetensors({k: sd[k] for k in keys[50:]}, tmp_path / "b.safetensors")
    loaded, _ = load_model(tmp_path)
    assert _equal(m, loaded)


def test_overlay_replaces_base_weights(tmp_path):
    base, gen = random_model(TINY, seed=1), random_model(TINY, seed=7)
    b = _write(base, tmp_path / "base.safetensors", "model.diffusion_model.")
    g = _write(gen, tmp_path / "gen", "model.", shards=2, meta=False)
    loaded, rep = load_model(b, g)
    assert _equal(gen, loaded)
    assert rep.overlay_prefix == "model."


def test_overlay_with_wrong_keys_is_an_error_naming_prefix_and_keys(tmp_path):
    base, gen = random_model(TINY, seed=1), random_model(TINY, seed=7)
    b = _write(base, tmp_path / "base.safetensors")
    bad = {"generator." + k: v for k, v in gen.state_dict().items()}
    save_safetensors(bad, tmp_path / "gen.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(b, tmp_path / "gen.safetensors")
    msg = str(e.value)
    assert "missing" in msg and "unexpected" in msg and "generator.adaln_single" in msg
    assert "extra prefix 'generator.'" in msg


def test_partial_overlay_is_refused_unless_allowed(tmp_path):
    base, gen = random_model(TINY, seed=1), random_model(TINY, seed=7)
    b = _write(base, tmp_path / "base.safetensors")
    part = {k: v for k, v in gen.state_dict().items() if not k.startswith("transformer_blocks.1.")}
    save_safetensors(part, tmp_path / "part.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_model(b, tmp_path / "part.safetensors")
    loaded, _ = load_model(b, tmp_path / "part.safetensors", allow_partial_overlay=True)
    assert torch.equal(loaded.transformer_blocks[1].attn1.to_q.weight, base.transformer_blocks[1].attn1.to_q.weight)
    assert torch.equal(loaded.transformer_blocks[0].attn1.to_q.weight, gen.transformer_blocks[0].attn1.to_q.weight)


def test_conventions_from_header_overlay_defaults_and_override(tmp_path):
    base_cfg = TINY.replace(rope=RopeConfig("split", "float64"), av_ca_timestep_scale_multiplier=1000.0)
    base = random_model(base_cfg, seed=1)
    b = _write(base, tmp_path / "base.safetensors", "model.diffusion_model.")
    m, rep = load_model(b)  # base alone: the header's conventions
    assert (m.config.rope.kind, m.config.rope.precision, m.config.av_ca_timestep_scale_multiplier) == \
        ("split", "float64", 1000.0)
    gen = random_model(TINY, seed=3)
    g = _write(gen, tmp_path / "gen.safetensors", meta=False)
    m, rep = load_model(b, g)  # a header-less generator: the released student's conventions
    assert (m.config.rope.kind, m.config.rope.precision, m.config.av_ca_timestep_scale_multiplier) == \
        ("interleaved", "float32", 1.0)
    assert rep.conventions.source["rope_kind"] == "OmniForcing student default"
    m, rep = load_model(b, g, conventions={"rope_kind": "split"})
    assert m.config.rope.kind == "split" and rep.conventions.source["rope_kind"] == "override"


def test_sizes_and_sinks_inferred_from_shapes(tmp_path):
    cfg = TINY.replace(num_layers=3, num_audio_sinks=5)
    m = random_model(cfg, seed=4)
    p = _write(m, tmp_path / "v1.safetensors", "model.")
    loaded, rep = load_model(p)
    assert loaded.config.num_layers == 3 and loaded.config.num_audio_sinks == 5
    assert rep.layout.kind == "prefix" and rep.layout.num_sinks == 5
    loaded, rep = load_model(p, drop_sinks=True)  # v1 checkpoint into the v2 model, as official loaders do
    assert rep.layout.kind == "v2" and not hasattr(loaded, "audio_sink_tokens")


@pytest.mark.parametrize("wd,expect", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32),
                                       (torch.bfloat16, torch.bfloat16), ("torch.float16", torch.float16)])
def test_weight_dtype_choice(tmp_path, wd, expect):
    p = _write(random_model(TINY, seed=1), tmp_path / "m.safetensors")
    m, rep = load_model(p, weight_dtype=wd)
    assert {t.dtype for t in m.state_dict().values()} == {expect}
    assert rep.weight_dtype == expect and rep.compute_dtype == expect


def test_dtypes_are_torch_dtypes_or_their_names(tmp_path):
    from omniforcing_core.loader import as_dtype
    assert as_dtype(None) is None and as_dtype("default") is None
    assert as_dtype("fp8_e4m3fn") is torch.float8_e4m3fn and as_dtype(torch.float8_e5m2) is torch.float8_e5m2
    assert as_dtype("bfloat16") is as_dtype("bf16") is as_dtype("torch.bfloat16") is torch.bfloat16
    for bad in ("fp4", torch.int8, 3):
        with pytest.raises(ValueError, match="unknown; use a torch dtype or one of default"):
            as_dtype(bad)
    p = _write(random_model(TINY, seed=1), tmp_path / "m.safetensors")
    m, rep = load_model(p, weight_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    assert m.transformer_blocks[0].attn1.to_q.weight.dtype == torch.float8_e4m3fn and m.dtype == torch.float32
    assert rep.weight_dtype == torch.float8_e4m3fn and rep.compute_dtype == torch.float32
    _, rep = load_model(p)  # as stored: no weight dtype, the stored one computes
    assert rep.weight_dtype is None and rep.compute_dtype == torch.float32
    with pytest.raises(ValueError, match="compute_dtype 'fp33' unknown"):
        load_model(p, compute_dtype="fp33")


def test_a_parsed_header_is_passed_without_metadata(tmp_path):
    """A model already in memory (ComfyUI's native MODEL) gives its header as a dict, not as file metadata."""
    from omniforcing_core.checkpoint import KeyMap
    from omniforcing_core.loader import infer_config, resolve_conventions
    cfg = TINY.replace(video_heads=4, video_head_dim=16, rope=RopeConfig("split", "float64"),
                       av_ca_timestep_scale_multiplier=1000.0, timestep_scale_multiplier=500.0)
    p = _write(random_model(cfg, seed=1), tmp_path / "m.safetensors")
    bare = KeyMap(scan(p).refs, "", [])  # the shapes only: no metadata at all
    header = header_for(cfg)
    conv = resolve_conventions(bare, None, None, base_header=header)
    assert (conv.rope_kind, conv.rope_precision, conv.av_ca_timestep_scale_multiplier) == ("split", "float64", 1000.0)
    assert conv.source["rope_kind"] == "base header"
    assert infer_config(bare, conv, header=header) == cfg  # head counts (4 x 16, not 32 x 2) from the dict
    assert infer_config(bare, conv, header=header) == infer_config(scan(p), resolve_conventions(scan(p), None, None))
    assert resolve_conventions(bare, None, None).source["rope_kind"] == "default"  # without it: defaults


@pytest.mark.parametrize("fp8", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_weights_are_stored_fp8_and_upcast_at_compute(tmp_path, fp8):
    from omniforcing_core.layout import make_clip, make_layout
    ref = random_model(TINY, seed=1)
    p = _write(ref, tmp_path / "m.safetensors")
    m, _ = load_model(p, weight_dtype=fp8, compute_dtype="fp32")
    lin = m.transformer_blocks[0].attn1.to_q
    assert lin.weight.dtype == getattr(torch, fp8.replace("fp8_", "float8_"))
    assert m.scale_shift_table.dtype == torch.float32 and lin.bias.dtype == torch.float32
    clip = make_clip(make_layout("v2"), 64, 64, seconds=1)
    v, a = torch.randn(clip.video_shape()), torch.randn(clip.audio_shape())
    ctx = torch.randn(1, 3, TINY.caption_channels)
    out = m(v, a, 0.5, 0.5, m.text_kv(ctx, ctx), None)[0]
    want = ref(v, a, 0.5, 0.5, ref.text_kv(ctx, ctx), None)[0]
    assert torch.isfinite(out).all()
    rel = ((out - want).norm() / want.norm()).item()
    assert 0 < rel < 0.35  # quantised, not identical, still the same function


def test_stored_fp8_checkpoint_loads_as_stored(tmp_path):
    m = random_model(TINY, seed=1)
    sd = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 and "table" not in k and "sink" not in k else v.bfloat16())
          for k, v in m.state_dict().items()}
    save_safetensors(sd, tmp_path / "fp8.safetensors", metadata=_meta(m.config))
    loaded, rep = load_model(tmp_path / "fp8.safetensors")
    assert loaded.transformer_blocks[0].ff.net[2].weight.dtype == torch.float8_e4m3fn
    assert loaded.dtype == torch.bfloat16 and "F8_E4M3" in rep.stored_dtypes


def test_truncated_and_corrupt_files_give_clear_errors(tmp_path):
    p = _write(random_model(TINY, seed=1), tmp_path / "m.safetensors", foreign=False)
    data = p.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "junk.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        load_model(tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "nope.safetensors")
    save_safetensors(FOREIGN, tmp_path / "vae.safetensors")  # a valid file, just not a transformer
    with pytest.raises(CheckpointError, match="no transformer weights"):
        load_model(tmp_path / "vae.safetensors")


def test_pickle_is_refused_unless_allowed_then_weights_only(tmp_path):
    m = random_model(TINY, seed=1)
    torch.save({"generator": {"model." + k: v for k, v in m.state_dict().items()}, "step": 5},
               tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(tmp_path / "model.pt")
    loaded, _ = load_model(tmp_path / "model.pt", allow_pickle=True, config=TINY)
    assert _equal(m, loaded)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_model(tmp_path / "evil.pt", allow_pickle=True, config=TINY)


def test_scan_reads_no_tensor_data(tmp_path):
    p = _write(random_model(TINY, seed=1), tmp_path / "m.safetensors")
    km = scan(p)
    assert km.prefix == "" and "patchify_proj.weight" in km.refs
    assert km.refs["patchify_proj.weight"].shape == (TINY.video_dim, 128)


def test_peak_host_memory_stays_near_one_copy(tmp_path):
    """Load a ~60 MB checkpoint in a fresh process and compare its peak RSS growth to the weights."""
    cfg = TINY.replace(num_layers=8, video_heads=4, video_head_dim=64, audio_heads=4, audio_head_dim=32,
                       caption_channels=256)
    m = random_model(cfg, seed=0)
    p = _write(m, tmp_path / "big.safetensors", foreign=False)
    size = p.stat().st_size
    code = f"""
import sys, re
sys.path.insert(0, {str(ROOT)!r})
import torch
from omniforcing_core.loader import load_model
def hwm():
    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024
def rss():
    return int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024
torch.zeros(1)
base = rss()
model, _ = load_model({str(p)!r})
print(hwm() - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    assert size > 50e6
    print(f"peak/size = {peak / size:.2f}")
    assert peak < 1.6 * size, f"peak growth {peak/1e6:.0f} MB for {size/1e6:.0f} MB of weights"


def test_connectors_load_from_the_base_and_follow_its_rope_layout(tmp_path):
    from omniforcing_core.config import TINY_WITH_CONNECTORS
    base = random_model(TINY_WITH_CONNECTORS.replace(rope=RopeConfig("split", "float64")), seed=1)
    b = _write(base, tmp_path / "base.safetensors", "model.diffusion_model.")
    gen = random_model(TINY, seed=2)  # transformer-only generator, like the released shards
    g = _write(gen, tmp_path / "gen.safetensors", meta=False)
    m, _ = load_model(b, g)
    assert m.config.connectors is not None and m.config.connectors.rope_kind == "split"
    assert m.config.rope.kind == "interleaved"  # the student's convention for the transformer
    assert torch.equal(m.video_embeddings_connector.learnable_registers,
                       base.video_embeddings_connector.learnable_registers)
    assert torch.equal(m.transformer_blocks[0].attn1.to_q.weight, gen.transformer_blocks[0].attn1.to_q.weight)
