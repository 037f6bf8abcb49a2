"""Checkpoint files are untrusted input: every malformed file is a CheckpointError that names the file,
the problem and the fix, never a raw TypeError/KeyError/RecursionError, a silent cast or a silent choice.

The malformed files are built by hand: 8-byte little-endian header length + JSON header + data.
"""
import json
import os
import struct
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch

from omniforcing_core import cli
from omniforcing_core.checkpoint import CheckpointError, read_header, save_safetensors, scan
from omniforcing_core.config import TINY
from omniforcing_core.embedded import random_model
from omniforcing_core.loader import header_for, load_model


def _raw(path: Path, header, data: bytes = b"", n=None) -> Path:
    """A hand-made safetensors file; `header` is an object to dump as JSON or raw bytes."""
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if n is None else n) + hb + data)
    return path


def _meta(cfg):
    return {"config": json.dumps({"transformer": header_for(cfg)})}


@pytest.fixture(scope="module")
def tiny():
    return random_model(TINY, seed=1)


def _sd(model, prefix=""):
    return {prefix + k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- one file's header

F32x2 = {"dtype": "F32", "shape": [2]}
BAD_HEADERS = {  # id: (header, data, fragment the message must hold)
    "header_is_a_list": ([1, 2], b"", "not a JSON object"),
    "header_is_a_string": ("weights", b"", "not a JSON object"),
    "entry_is_not_an_object": ({"a": 5}, b"", "'a'"),
    "entry_without_data_offsets": ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), "data_offsets"),
    "data_offsets_a_string": ({"a": {**F32x2, "data_offsets": "0,8"}}, bytes(8), "data_offsets"),
    "data_offsets_one_number": ({"a": {**F32x2, "data_offsets": [8]}}, bytes(8), "data_offsets"),
    "data_offsets_floats": ({"a": {**F32x2, "data_offsets": [0.0, 8.0]}}, bytes(8), "data_offsets"),
    "data_offsets_bools": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, bytes(1),
                           "data_offsets"),
    "negative_offset": ({"a": {**F32x2, "data_offsets": [-8, 0]}}, bytes(8), "data_offsets"),
    "begin_after_end": ({"a": {**F32x2, "data_offsets": [8, 0]}}, bytes(8), "data_offsets"),
    "offsets_past_the_end_of_the_file": ({"a": {**F32x2, "data_offsets": [2**40, 2**40 + 8]}}, bytes(8),
                                         "truncated"),
    "overlapping_tensors": ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [4, 12]}},
                            bytes(12), "overlap"),
    "hole_between_tensors": ({"a": {**F32x2, "data_offsets": [0, 8]}, "b": {**F32x2, "data_offsets": [12, 20]}},
                             bytes(20), "gap"),
    "bytes_after_the_last_tensor": ({"a": {**F32x2, "data_offsets": [0, 8]}}, bytes(16), "after the last tensor"),
    "shape_dtype_disagree_with_length": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8),
                                         "3 x F32"),
    "shape_null": ({"a": {"dtype": "F32", "shape": None, "data_offsets": [0, 8]}}, bytes(8), "shape"),
    "shape_a_string": ({"a": {"dtype": "F32", "shape": "ab", "data_offsets": [0, 8]}}, bytes(8), "shape"),
    "shape_negative": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "shape"),
    "dtype_unknown": ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "dtype"),
    "dtype_not_a_string": ({"a": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "dtype"),
    "metadata_a_list": ({"__metadata__": [1], "a": {**F32x2, "data_offsets": [0, 8]}}, bytes(8), "__metadata__"),
    "metadata_value_not_a_string": ({"__metadata__": {"config": {"x": 1}}, "a": {**F32x2, "data_offsets": [0, 8]}},
                                    bytes(8), "__metadata__"),
    "duplicate_key_in_header": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, '
                                b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', bytes(8), "twice"),
    "deep_nesting": (b"[" * 200_000 + b"]" * 200_000, b"", "nested"),
    "deep_nesting_inside_an_entry": (b'{"a": ' + b'{"x": ' * 100_000 + b"1" + b"}" * 100_001, b"", "nested"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_malformed_header_is_a_checkpoint_error_naming_the_file(tmp_path, case):
    header, data, fragment = BAD_HEADERS[case]
    p = _raw(tmp_path / f"{case}.safetensors", header, data)
    with pytest.raises(CheckpointError) as e:
        scan(p)  # headers only: what `info` and the ComfyUI node's dtype probe read
    msg = str(e.value)
    assert str(p) in msg and fragment in msg, msg
    assert "re-download" in msg or "re-save" in msg or "convert" in msg, msg  # says what to do


def test_a_hand_made_valid_file_is_accepted_and_matches_safetensors(tmp_path):
    from safetensors.torch import load_file
    a, b = torch.arange(2, dtype=torch.float32), torch.tensor([[1, 2, 3]], dtype=torch.int16)
    hdr = {"__metadata__": {"k": "v"}, "b": {"dtype": "I16", "shape": [1, 3], "data_offsets": [8, 14]},
           "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "e": {"dtype": "F16", "shape": [0, 4], "data_offsets": [14, 14]}}
    p = _raw(tmp_path / "ok.safetensors", hdr, a.numpy().tobytes() + b.numpy().tobytes())
    h = read_header(p)
    assert h.metadata == {"k": "v"} and h.tensors["b"].shape == (1, 3) and h.tensors["e"].shape == (0, 4)
    assert torch.equal(load_file(str(p))["b"], b)


def test_oversized_header_is_refused_before_it_is_read(tmp_path):
    """Headers over safetensors' own 100 MB cap: refused from the length field alone (was: read and parsed,
    195 MB took 6 min and 4.4 GB)."""
    n = 100_000_001
    p = tmp_path / "huge.safetensors"
    with open(p, "wb") as f:  # sparse: no disk used
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n + 64)
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as e:
            scan(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    msg = str(e.value)
    assert str(p) in msg and "100 MB" in msg and f"{n:,}" in msg, msg
    assert peak < 1_000_000 and time.perf_counter() - t0 < 1.0  # nothing of the header was read


# ---------------------------------------------------------------- shard indexes


def _sharded(model, folder: Path, shards=2) -> Path:
    return save_safetensors(_sd(model), folder / "m", shards=shards, metadata=_meta(model.config))


def _rewrite_index(idx: Path, fn) -> Path:
    d = json.loads(idx.read_text())
    d = fn(d)
    idx.write_text(json.dumps(d))
    return idx


BAD_INDEXES = {
    "index_is_a_list": (lambda d: [d], "not a JSON object"),
    "weight_map_is_a_list": (lambda d: {"weight_map": list(d["weight_map"])}, "weight_map"),
    "weight_map_value_not_a_string": (lambda d: {"weight_map": {k: 3 for k in d["weight_map"]}}, "weight_map"),
    "weight_map_empty": (lambda d: {"weight_map": {}}, "weight_map"),
}


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_malformed_index_is_a_checkpoint_error(tmp_path, tiny, case):
    fn, fragment = BAD_INDEXES[case]
    idx = _rewrite_index(_sharded(tiny, tmp_path), fn)
    with pytest.raises(CheckpointError) as e:
        scan(idx)
    assert str(idx) in str(e.value) and fragment in str(e.value), str(e.value)


def test_index_that_is_deeply_nested_or_not_text_is_a_checkpoint_error(tmp_path):
    idx = tmp_path / "m.safetensors.index.json"
    idx.write_text('{"weight_map": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(CheckpointError, match="nested"):
        scan(idx)
    idx.write_bytes(b'{"weight_map": {"a": "\xff\xfe.safetensors"}}')
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        scan(idx)


def test_key_in_two_shards_is_an_error_naming_key_and_both_shards(tmp_path, tiny):
    idx = _sharded(tiny, tmp_path)
    wm = json.loads(idx.read_text())["weight_map"]
    first, second = sorted(set(wm.values()))
    key = next(k for k, f in wm.items() if f == first)
    # the second shard also holds `key` (other values); the index still says the first one
    others = {k: tiny.state_dict()[k] for k, f in wm.items() if f == second}
    save_safetensors(others | {key: torch.zeros_like(tiny.state_dict()[key])}, idx.parent / second)
    with pytest.raises(CheckpointError) as e:
        scan(idx)
    msg = str(e.value)
    assert key in msg and first in msg and second in msg, msg


def test_key_in_two_files_of_a_folder_is_an_error(tmp_path, tiny):
    sd = _sd(tiny)
    keys = list(sd)
    save_safetensors({k: sd[k] for k in keys[:60]}, tmp_path / "a.safetensors", metadata=_meta(tiny.config))
    save_safetensors({k: sd[k] for k in keys[59:]}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path)
    msg = str(e.value)
    assert keys[59] in msg and "a.safetensors" in msg and "b.safetensors" in msg, msg


def test_index_naming_a_key_its_shard_lacks_is_an_error(tmp_path, tiny):
    idx = _sharded(tiny, tmp_path)
    shard = sorted(set(json.loads(idx.read_text())["weight_map"].values()))[0]
    _rewrite_index(idx, lambda d: d | {"weight_map": d["weight_map"] | {"transformer_blocks.9.ghost.weight": shard}})
    with pytest.raises(CheckpointError) as e:
        scan(idx)
    msg = str(e.value)
    assert "transformer_blocks.9.ghost.weight" in msg and shard in msg and "regenerate" in msg, msg


def test_index_pointing_a_key_at_the_wrong_shard_is_an_error(tmp_path, tiny):
    idx = _sharded(tiny, tmp_path)
    wm = json.loads(idx.read_text())["weight_map"]
    first, second = sorted(set(wm.values()))
    key = next(k for k, f in wm.items() if f == first)
    _rewrite_index(idx, lambda d: d | {"weight_map": wm | {key: second}})
    with pytest.raises(CheckpointError) as e:
        scan(idx)
    assert key in str(e.value) and second in str(e.value)


def test_shard_holding_a_key_the_index_does_not_list_is_an_error(tmp_path, tiny):
    idx = _sharded(tiny, tmp_path)
    wm = json.loads(idx.read_text())["weight_map"]
    key = next(iter(wm))
    _rewrite_index(idx, lambda d: d | {"weight_map": {k: f for k, f in wm.items() if k != key}})
    with pytest.raises(CheckpointError) as e:
        scan(idx)
    assert key in str(e.value) and "does not list" in str(e.value)


def _outside_shard(tmp_path, tiny, how):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    victim = save_safetensors(_sd(tiny), outside / "victim.safetensors", metadata=_meta(tiny.config))
    if how == "dotdot":
        name = "../outside/victim.safetensors"
    elif how == "absolute":
        name = str(victim)
    else:  # a symlink inside the folder that resolves outside it
        os.symlink(victim, inside / "link.safetensors")
        name = "link.safetensors"
    idx = inside / "m.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {k: name for k in _sd(tiny)}}))
    return idx


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_shard_paths_outside_the_index_folder_are_refused(tmp_path, tiny, how):
    idx = _outside_shard(tmp_path, tiny, how)
    with pytest.raises(CheckpointError) as e:
        scan(idx)
    assert str(idx) in str(e.value) and "outside" in str(e.value), str(e.value)


def test_shards_in_a_subfolder_and_symlinks_within_the_folder_are_fine(tmp_path, tiny):
    idx = _sharded(tiny, tmp_path)
    d = json.loads(idx.read_text())
    names = sorted(set(d["weight_map"].values()))
    (idx.parent / "sub").mkdir()
    (idx.parent / names[0]).rename(idx.parent / "sub" / names[0])
    (idx.parent / names[1]).rename(idx.parent / "real.safetensors")
    os.symlink("real.safetensors", idx.parent / names[1])
    _rewrite_index(idx, lambda d: d | {"weight_map": {k: ("sub/" + f if f == names[0] else f)
                                                      for k, f in d["weight_map"].items()}})
    m, _ = load_model(idx)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), tiny.state_dict().values()))


def _pickle_index(tmp_path, tiny, shards):
    sd = _sd(tiny)
    keys = list(sd)
    per = -(-len(keys) // shards)
    wm = {}
    for i in range(shards):
        name = f"part{i}.bin"
        part = {k: sd[k] for k in keys[i * per:(i + 1) * per]}
        torch.save(part, tmp_path / name)
        wm |= {k: name for k in part}
    idx = tmp_path / "pytorch_model.bin.index.json"
    idx.write_text(json.dumps({"weight_map": wm}))
    return idx


def test_index_with_pickle_shards_needs_the_pickle_opt_in(tmp_path, tiny, monkeypatch):
    idx = _pickle_index(tmp_path, tiny, 1)
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    with pytest.raises(CheckpointError) as e:
        scan(idx)
    assert "part0.bin" in str(e.value) and "allow_pickle" in str(e.value) and not calls
    m, _ = load_model(idx, allow_pickle=True, config=TINY)
    assert calls and all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), tiny.state_dict().values()))


def test_several_pickle_shards_all_load(tmp_path, tiny):
    idx = _pickle_index(tmp_path, tiny, 3)
    m, _ = load_model(idx, allow_pickle=True, config=TINY)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), tiny.state_dict().values()))


def test_shard_of_unknown_format_is_refused(tmp_path, tiny):
    idx = _sharded(tiny, tmp_path)
    d = json.loads(idx.read_text())
    name = sorted(set(d["weight_map"].values()))[0]
    (idx.parent / name).rename(idx.parent / "x.txt")
    _rewrite_index(idx, lambda d: d | {"weight_map": {k: ("x.txt" if f == name else f)
                                                      for k, f in d["weight_map"].items()}})
    with pytest.raises(CheckpointError, match="x.txt"):
        scan(idx)


# ---------------------------------------------------------------- the header's `config` metadata

BAD_CONFIGS = {  # it decides the RoPE layout and gate multiplier: corrupt is an error, not "no config"
    "not_json": "{rope_type: split",
    "an_array": "[1, 2]",
    "transformer_not_an_object": json.dumps({"transformer": 5}),
    "deeply_nested": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_corrupt_config_metadata_is_an_error_not_ignored(tmp_path, tiny, case):
    p = save_safetensors(_sd(tiny), tmp_path / "m.safetensors", metadata={"config": BAD_CONFIGS[case]})
    with pytest.raises(CheckpointError) as e:
        load_model(p)
    assert str(p) in str(e.value) and "'config' metadata" in str(e.value), str(e.value)


# ---------------------------------------------------------------- tensor dtypes and values


@pytest.mark.parametrize("weight_dtype", ["default", "bf16"])
def test_integer_and_bool_weights_are_refused_not_cast(tmp_path, tiny, weight_dtype):
    # the transformer has no integer buffers: every tensor it loads is a float parameter
    with torch.device("meta"):
        assert all(t.is_floating_point() for t in type(tiny)(TINY).state_dict().values())
    sd = _sd(tiny)
    sd["scale_shift_table"] = sd["scale_shift_table"].long()
    sd["patchify_proj.bias"] = sd["patchify_proj.bias"] > 0
    p = save_safetensors(sd, tmp_path / "int.safetensors", metadata=_meta(TINY))
    with pytest.raises(CheckpointError) as e:
        load_model(p, weight_dtype=weight_dtype)
    msg = str(e.value)
    assert str(p) in msg and "scale_shift_table (I64)" in msg and "patchify_proj.bias (BOOL)" in msg, msg
    assert "2 tensors" in msg and "floating" in msg


def test_non_finite_weights_warn_with_names_and_count(tmp_path, tiny):
    sd = _sd(tiny)
    sd["scale_shift_table"][0, 0] = float("nan")
    sd["patchify_proj.weight"][1, 2] = float("inf")
    p = save_safetensors(sd, tmp_path / "nan.safetensors", metadata=_meta(TINY))
    with pytest.warns(RuntimeWarning) as rec:
        m, _ = load_model(p)
    msg = str(rec[0].message)
    assert "2 tensors" in msg and "scale_shift_table" in msg and "patchify_proj.weight" in msg and str(p) in msg
    assert torch.isnan(m.scale_shift_table).any()  # a warning, not an error: the weights load as stored


def test_non_finite_fp8_weights_warn_and_clean_weights_do_not(tmp_path, tiny):
    sd = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 and "table" not in k else v) for k, v in _sd(tiny).items()}
    p = save_safetensors(sd, tmp_path / "fp8.safetensors", metadata=_meta(TINY))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_model(p)
    sd["transformer_blocks.0.attn1.to_q.weight"][0, 0] = float("nan")
    save_safetensors(sd, p, metadata=_meta(TINY))
    with pytest.warns(RuntimeWarning, match="transformer_blocks.0.attn1.to_q.weight"):
        load_model(p)


# ---------------------------------------------------------------- `info` validates as the loader does


def _info(capsys, *paths):
    rc = cli.main(["info", *map(str, paths)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_info_refuses_an_overlay_the_loader_refuses(tmp_path, tiny, capsys):
    base = save_safetensors(_sd(tiny), tmp_path / "base.safetensors", metadata=_meta(TINY))
    bad = save_safetensors({"generator." + k: v for k, v in _sd(tiny).items()}, tmp_path / "gen.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_model(base, bad)
    rc, out, err = _info(capsys, base, bad)
    assert rc != 0 and err.strip() == f"error: {e.value}" and not out


def test_info_refuses_corrupt_offsets_and_non_float_weights(tmp_path, tiny, capsys):
    base = save_safetensors(_sd(tiny), tmp_path / "base.safetensors", metadata=_meta(TINY))
    data = bytearray(base.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    k0, k1 = "transformer_blocks.0.attn1.to_k.weight", "transformer_blocks.0.attn1.to_q.weight"
    header[k1]["data_offsets"] = header[k0]["data_offsets"]  # two tensors on the same bytes
    bad = tmp_path / "overlap.safetensors"
    hb = json.dumps(header).encode()
    bad.write_bytes(struct.pack("<Q", len(hb)) + hb + bytes(data[8 + n:]))
    rc, out, err = _info(capsys, bad)
    assert rc != 0 and "overlap" in err and str(bad) in err and not out
    sd = _sd(tiny)
    sd["scale_shift_table"] = sd["scale_shift_table"].long()
    ints = save_safetensors(sd, tmp_path / "int.safetensors", metadata=_meta(TINY))
    rc, out, err = _info(capsys, ints)
    assert rc != 0 and "scale_shift_table (I64)" in err and not out


def test_info_still_reports_a_good_base_and_overlay(tmp_path, tiny, capsys):
    base = save_safetensors(_sd(tiny, "model.diffusion_model."), tmp_path / "base.safetensors",
                            metadata=_meta(TINY))
    gen = save_safetensors(_sd(random_model(TINY, seed=3), "model."), tmp_path / "gen", shards=2)
    rc, out, err = _info(capsys, base, gen)
    assert rc == 0, err
    info = json.loads(out)
    assert info["key_prefix"] == "model.diffusion_model." and info["overlay"]["key_prefix"] == "model."
    assert info["tensors"] == len(tiny.state_dict()) and info["overlay"]["tensors"] == len(tiny.state_dict())
    assert info["conventions"]["from"]["rope_kind"] == "OmniForcing student default"


@pytest.mark.parametrize("where,bad", [
    ("heads", {"num_attention_heads": "abc"}), ("heads", {"num_attention_heads": [1, 2]}),
    ("heads", {"attention_head_dim": -3}),
    ("own", {"rope_kind": 5}), ("own", {"qk_norm_eps": "x"}), ("own", {"causal_fix": "maybe"}),
    ("ltx", {"rope_type": 5}), ("ltx", {"frequencies_precision": []}),
    ("ltx", {"av_ca_timestep_scale_multiplier": "x"}), ("ltx", {"causal_temporal_positioning": "maybe"}),
])
def test_header_values_of_the_wrong_type_are_a_checkpoint_error(tmp_path, where, bad):
    """Values inside a valid config are data too: never coerced ('32' or [32] is no head count)."""
    import json as _json

    from omniforcing_core.config import TINY
    from omniforcing_core.embedded import random_model
    from omniforcing_core.loader import HEADER_CONVENTIONS, header_for, load_model
    m = random_model(TINY)
    h = header_for(m.config)
    if where == "own":
        h[HEADER_CONVENTIONS] = {**h[HEADER_CONVENTIONS], **bad}
    else:
        if where == "ltx":
            h.pop(HEADER_CONVENTIONS)
        h.update(bad)
    p = save_safetensors(dict(m.state_dict()), tmp_path / "m.safetensors",
                         metadata={"config": _json.dumps({"transformer": h})})
    with pytest.raises(CheckpointError, match=list(bad)[0] if where != "heads" else "not positive whole numbers"):
        load_model(p)
    good = header_for(m.config)  # negative control: the same file with its own header loads
    p2 = save_safetensors(dict(m.state_dict()), tmp_path / "ok.safetensors",
                          metadata={"config": _json.dumps({"transformer": good})})
    load_model(p2)
