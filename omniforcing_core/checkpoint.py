"""Reading checkpoint files without loading them: sources, headers, key prefixes.

A source is one `.safetensors` file, a sharded `*.safetensors.index.json`, or a folder. Headers
are parsed by hand so a truncated or corrupt file is named before any tensor is read, and so
shapes are known without touching the data. Pickle formats are refused unless asked for.
"""
from __future__ import annotations

import functools
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

# prefixes of other models that share the LTX-2 single-file checkpoint
FOREIGN_PREFIXES = ("vae.", "audio_vae.", "vocoder.", "text_embedding_projection.", "model.vae.",
                    "model.audio_vae.", "model.vocoder.", "conditioner.", "first_stage_model.")
KNOWN_PREFIXES = ("model.diffusion_model.", "model.velocity_model.", "diffusion_model.", "model.")
CONNECTOR_PREFIXES = ("video_embeddings_connector.", "audio_embeddings_connector.")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as given; the message says what to do."""


@dataclass(frozen=True)
class TensorRef:
    file: Path
    key: str  # key as stored in the file
    dtype: str
    shape: tuple[int, ...]

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class FileHeader:
    path: Path
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]


MAX_HEADER_BYTES = 100_000_000  # safetensors' own cap on the JSON header (and ours on an index file)
# bits per element of every dtype safetensors defines (sub-byte types pack; a tensor must fill whole bytes)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
              "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return d


def _short(x, n: int = 80) -> str:
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


def _parse_json(raw: bytes, path: Path, problem: str, fix: str):
    """JSON from untrusted bytes: UTF-8 only, no duplicate keys, nesting depth bounded by Python's stack."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: {problem} ({e}); {fix}") from None
    except RecursionError:
        raise CheckpointError(f"{path}: {problem} (JSON nested too deeply to be one); {fix}") from None
    except _DuplicateKey as e:
        raise CheckpointError(f"{path}: {problem} (key {_short(e.args[0])} appears twice); {fix}") from None


def _is_count(x) -> bool:
    return type(x) is int and x >= 0  # not bool, not float


def _json_kind(x) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(x), "null")


def _entry_error(path: Path, key: str, fix: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: corrupt safetensors header: tensor {_short(key)} {what}; {fix}")


def read_header(path: Path) -> FileHeader:
    """Parse and validate a safetensors header as safetensors does, without reading tensor data.

    Every entry needs a known dtype, a shape of non-negative ints and [begin, end] offsets whose span
    is exactly shape x dtype bytes; the tensors must tile the data section (no overlap, gap or tail).
    """
    path = Path(path)
    size = path.stat().st_size
    redl = "re-download the file (or re-save it with safetensors)"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file (truncated download?)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:  # refused from the length field alone: nothing more is read
            raise CheckpointError(f"{path}: not a usable safetensors file: its header would be {n:,} bytes, over "
                                  f"the 100 MB limit safetensors itself enforces (a corrupt file, or not "
                                  f"safetensors); {redl}")
        if n > size - 8:
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header says {n} bytes, "
                                  f"file has {size}); re-download it")
        header = _parse_json(f.read(n), path, "corrupt safetensors header", redl)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header: it is a JSON {_json_kind(header)}, not a JSON "
                              f"object of tensors; {redl}")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings, "
                              f"found {_short(metadata)}; re-save the file with safetensors")
    data_len = size - 8 - n
    tensors, spans = {}, []
    for key, info in header.items():
        bad = functools.partial(_entry_error, path, key, redl)
        if not isinstance(info, dict):
            raise bad(f"is described by {_short(info)}, not an object with dtype, shape and data_offsets")
        missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
        if missing:
            raise bad(f"has no {' or '.join(missing)}")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise bad(f"has dtype {_short(dtype)}, not a safetensors dtype ({', '.join(DTYPE_BITS)})")
        if type(shape) is not list or not all(type(s) is int and s >= 0 for s in shape):
            raise bad(f"has shape {_short(shape)}; a shape is a list of non-negative integers")
        if not (type(offs) is list and len(offs) == 2 and _is_count(offs[0]) and _is_count(offs[1])
                and offs[0] <= offs[1]):
            raise bad(f"has data_offsets {_short(offs)}; they must be [begin, end] integers with 0 <= begin <= end")
        begin, end = offs
        numel = 1
        for s in shape:
            numel *= s
        bits = numel * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise bad(f"holds {numel} x {dtype} ({bits / 8:g} bytes) but its data_offsets {offs} span "
                      f"{end - begin} bytes")
        if end > data_len:
            raise CheckpointError(f"{path}: truncated: tensor '{key}' ends at byte {end} of the data but the file "
                                  f"holds {data_len}; re-download the file")
        spans.append((begin, end, key))
        tensors[key] = TensorRef(path, key, dtype, tuple(shape))
    pos, prev = 0, None  # the tensors must tile the data: what safetensors checks before it maps the file
    for begin, end, key in sorted(spans):
        if begin < pos:
            raise CheckpointError(f"{path}: corrupt safetensors header: tensors '{prev}' and '{key}' overlap (bytes "
                                  f"{begin}-{min(end, pos)} of the data belong to both); {redl}")
        if begin > pos:
            raise CheckpointError(f"{path}: corrupt safetensors header: a gap of {begin - pos} bytes that no tensor "
                                  f"covers lies before tensor '{key}'; {redl}")
        pos, prev = end, key
    if pos != data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file: {data_len - pos} bytes after the last tensor "
                              f"that no tensor covers; {redl}")
    return FileHeader(path, tensors, metadata)


def _read_index(p: Path) -> dict[str, str]:
    """The weight_map of a `*.index.json`: a non-empty map of tensor name -> shard file name."""
    size = p.stat().st_size
    fix = "re-download it, or delete it to load the folder's *.safetensors files directly"
    if size > MAX_HEADER_BYTES:
        raise CheckpointError(f"{p}: not a safetensors index: {size:,} bytes (an index lists names, a few MB at "
                              f"most); {fix}")
    with open(p, "rb") as f:
        raw = f.read()
    d = _parse_json(raw, p, "not a safetensors index", fix)
    if not isinstance(d, dict):
        raise CheckpointError(f"{p}: not a safetensors index: it is a JSON {_json_kind(d)}, not a JSON object with "
                              f"a 'weight_map'; {fix}")
    wm = d.get("weight_map")
    if not isinstance(wm, dict) or not wm or not all(isinstance(v, str) for v in wm.values()):
        raise CheckpointError(f"{p}: not a safetensors index: 'weight_map' must be a non-empty object mapping each "
                              f"tensor name to a shard file name, found {_short(wm)}; {fix}")
    return wm


def _shard_path(index: Path, name: str, allow_pickle: bool) -> Path:
    """A shard the index names: a file inside the index's own folder (symlinks resolved), of a known format."""
    rel = Path(name)
    folder = index.parent
    if rel.is_absolute() or ".." in rel.parts:
        raise CheckpointError(f"{index}: shard '{name}' lies outside the index's folder {folder}; an index may only "
                              f"name files in its own folder: move the shard next to the index and name it there")
    f = folder / rel
    if not f.is_file():
        return f  # reported with the other missing shards
    real = f.resolve()
    if not real.is_relative_to(folder.resolve()):
        raise CheckpointError(f"{index}: shard '{name}' is a link to {real}, outside the index's folder {folder}; "
                              f"an index may only name files in its own folder: copy the shard into it")
    if f.suffix in PICKLE_SUFFIXES and not allow_pickle:
        raise CheckpointError(f"{index}: shard '{name}' is a pickle file, which can run code when loaded; convert "
                              f"the shards to safetensors or allow it explicitly (allow_pickle=True / "
                              f"--allow-pickle), which uses torch.load(weights_only=True)")
    if f.suffix != ".safetensors" and f.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{index}: shard '{name}' has unknown format '{f.suffix}'; shards are .safetensors "
                              f"(or, with allow_pickle, {'/'.join(PICKLE_SUFFIXES)})")
    return f


Index = tuple[Path, dict[str, Path]]  # an index file and its weight_map (tensor name -> shard path)


def _resolve(source: os.PathLike | str, allow_pickle: bool) -> tuple[list[Path], Optional[Index]]:
    """resolve_files, plus the index when the source is one (or a folder holding one)."""
    p = Path(source)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        idx = sorted(p.glob("*.safetensors.index.json"))
        if idx:
            return _resolve(idx[0], allow_pickle)
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{p}: folder holds no *.safetensors or *.safetensors.index.json")
        return files, None
    if p.name.endswith(".json"):
        wm = _read_index(p)
        shards = {name: _shard_path(p, name, allow_pickle) for name in dict.fromkeys(wm.values())}
        missing = [str(f) for f in shards.values() if not f.is_file()]
        if missing:
            raise CheckpointError(f"{p}: {len(missing)} shard(s) missing next to the index, e.g. {missing[0]}")
        return list(dict.fromkeys(shards.values())), (p, {k: shards[v] for k, v in wm.items()})
    if p.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(f"{p}: pickle checkpoints can run code when loaded; convert it to safetensors or "
                                  f"allow it explicitly (allow_pickle=True / --allow-pickle), which uses "
                                  f"torch.load(weights_only=True)")
        return [p], None
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: unknown checkpoint format '{p.suffix}'; expected .safetensors, a "
                              f"*.safetensors.index.json or a folder")
    return [p], None


def resolve_files(source: os.PathLike | str, allow_pickle: bool = False) -> list[Path]:
    """A file, a `*.index.json` or a folder -> the weight files it stands for."""
    return _resolve(source, allow_pickle)[0]


def _check_index(index: Path, weight_map: dict[str, Path], owner: dict[str, Path]) -> None:
    """The index must agree with the shards' own headers: each key in the shard it names, and only there."""
    wrong = [f"'{k}' -> {f.name} (" + (f"stored in {owner[k].name})" if k in owner else "in no shard)")
             for k, f in weight_map.items() if owner.get(k) != f]
    unlisted = [f"'{k}' in {f.name}" for k, f in owner.items() if k not in weight_map]
    if wrong or unlisted:
        lines = [f"{index}: the index does not agree with its shards:"]
        if wrong:
            lines.append(f"  {len(wrong)} key(s) not in the shard the index names, first: {', '.join(wrong[:3])}")
        if unlisted:
            lines.append(f"  {len(unlisted)} key(s) in a shard that the index does not list, first: "
                         f"{', '.join(unlisted[:3])}")
        lines.append("  regenerate the index from the shards (or delete it to load the folder's *.safetensors)")
        raise CheckpointError("\n".join(lines))


@dataclass
class KeyMap:
    """Stored keys mapped to model keys (prefix stripped, foreign weights set aside)."""

    refs: dict[str, TensorRef]  # model key -> where the tensor is
    prefix: str
    ignored: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    pickled: Optional[dict[str, torch.Tensor]] = None  # only for explicitly allowed pickle files
    source: str = "checkpoint"  # what was scanned, for messages

    def config_json(self) -> Optional[dict]:
        """The header's `config` metadata (LTX-style), None when absent; malformed is an error, not ignored:
        it decides conventions (RoPE layout, precision, gate multiplier) that shapes cannot reveal."""
        raw = self.metadata.get("config")
        if not raw:
            return None
        fix = "re-save the file without the 'config' metadata, or with a valid one, and pass conventions explicitly"
        cj = _parse_json(raw.encode("utf-8", "surrogatepass"), Path(self.source), "corrupt 'config' metadata", fix)
        if not isinstance(cj, dict) or not isinstance(cj.get("transformer", {}), dict):
            bad = cj if not isinstance(cj, dict) else cj["transformer"]
            raise CheckpointError(f"{self.source}: corrupt 'config' metadata: expected a JSON object (with an object "
                                  f"'transformer'), found a JSON {_json_kind(bad)}; {fix}")
        return cj


def detect_prefix(keys: list[str]) -> str:
    for pre in KNOWN_PREFIXES:
        if any(k.startswith(pre + "transformer_blocks.") or k.startswith(pre + "patchify_proj.") for k in keys):
            return pre
    return ""


def map_keys(stored: dict[str, TensorRef]) -> tuple[dict[str, TensorRef], str, list[str]]:
    keys = list(stored)
    prefix = detect_prefix(keys)
    refs, ignored = {}, []
    for k in keys:
        if k.startswith(FOREIGN_PREFIXES) or (prefix and not k.startswith(prefix)):
            ignored.append(k)
            continue
        refs[k[len(prefix):]] = stored[k]
    return refs, prefix, ignored


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling failure the same way
        raise CheckpointError(f"{path}: could not be read with torch.load(weights_only=True): {e}") from None
    for key in ("generator_ema", "generator", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: state dict keys must be strings, found {_short(bad[:3])}; re-save it")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def scan(source: os.PathLike | str, allow_pickle: bool = False) -> KeyMap:
    """Index every tensor of a source by model key, without reading tensor data (pickles excepted)."""
    files, index = _resolve(source, allow_pickle)
    stored: dict[str, TensorRef] = {}
    owner: dict[str, Path] = {}
    metadata: dict[str, str] = {}
    pickled: Optional[dict[str, torch.Tensor]] = None
    for f in files:
        if f.suffix in PICKLE_SUFFIXES:
            part = _load_pickle(f)
            pickled = (pickled or {}) | part
            tensors = {k: TensorRef(f, k, str(v.dtype), tuple(v.shape)) for k, v in part.items()}
        else:
            h = read_header(f)
            metadata.update(h.metadata)
            tensors = h.tensors
        for k in tensors:
            if k in owner:
                raise CheckpointError(f"'{k}' is stored in two files, {owner[k]} and {f}, and either could be meant; "
                                      f"remove the stale one (a leftover shard of another download?)")
            owner[k] = f
        stored.update(tensors)
    if index is not None:
        _check_index(*index, owner)
    refs, prefix, ignored = map_keys(stored)
    if not refs:
        raise CheckpointError(f"{source}: no transformer weights found (saw {len(stored)} tensors, e.g. "
                              f"{list(stored)[:3]}); is this a VAE or text-encoder file?")
    km = KeyMap(refs, prefix, ignored, metadata, source=str(source))
    if pickled is not None:
        km.pickled = {k[len(prefix):]: v for k, v in pickled.items() if k[len(prefix):] in refs}
    return km


def save_safetensors(tensors: dict[str, torch.Tensor], path: os.PathLike | str, *, prefix: str = "",
                     shards: int = 1, metadata: Optional[dict[str, str]] = None) -> Path:
    """Write tensors with a key prefix, as one file or as shards plus an index. Returns what to load."""
    from safetensors.torch import save_file

    path = Path(path)
    items = [(prefix + k, v.detach().contiguous().cpu()) for k, v in tensors.items()]
    if shards <= 1:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(dict(items), str(path), metadata=metadata)
        return path
    path.mkdir(parents=True, exist_ok=True)
    stem = path.name
    per = -(-len(items) // shards)
    weight_map = {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = dict(items[i * per:(i + 1) * per])
        save_file(chunk, str(path / name), metadata=metadata)
        weight_map.update({k: name for k in chunk})
    index = path / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    return index
