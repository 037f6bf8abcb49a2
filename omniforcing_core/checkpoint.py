"""Reading checkpoint files without loading them: sources, headers, key prefixes.

A source is one `.safetensors` file, a sharded `*.safetensors.index.json`, or a folder. Headers
are parsed by hand so a truncated or corrupt file is named before any tensor is read, and so
shapes are known without touching the data. Pickle formats are refused unless asked for.
"""
from __future__ import annotations

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


def read_header(path: Path) -> FileHeader:
    """Parse a safetensors header and check the file is long enough for every tensor it lists."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short to be a safetensors file (truncated download?)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 200 * 2**20:
            raise CheckpointError(f"{path}: not a safetensors file or truncated (header says {n} bytes, "
                                  f"file has {size}); re-download it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download the file") from None
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    tensors = {}
    for key, info in header.items():
        end = info["data_offsets"][1]
        if end > data_len:
            raise CheckpointError(f"{path}: truncated: tensor '{key}' ends at byte {end} of the data but the file "
                                  f"holds {data_len}; re-download the file")
        tensors[key] = TensorRef(path, key, info["dtype"], tuple(info["shape"]))
    return FileHeader(path, tensors, metadata)


def resolve_files(source: os.PathLike | str, allow_pickle: bool = False) -> list[Path]:
    """A file, a `*.index.json` or a folder -> the weight files it stands for."""
    p = Path(source)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or folder")
    if p.is_dir():
        idx = sorted(p.glob("*.safetensors.index.json"))
        if idx:
            return resolve_files(idx[0], allow_pickle)
        files = sorted(p.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{p}: folder holds no *.safetensors or *.safetensors.index.json")
        return files
    if p.name.endswith(".json"):
        try:
            wm = json.loads(p.read_text())["weight_map"]
        except (KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{p}: not a safetensors index (needs a 'weight_map'): {e}") from None
        files = [p.parent / f for f in dict.fromkeys(wm.values())]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{p}: {len(missing)} shard(s) missing next to the index, e.g. {missing[0]}")
        return files
    if p.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointError(f"{p}: pickle checkpoints can run code when loaded; convert it to safetensors or "
                                  f"allow it explicitly (allow_pickle=True / --allow-pickle), which uses "
                                  f"torch.load(weights_only=True)")
        return [p]
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: unknown checkpoint format '{p.suffix}'; expected .safetensors, a "
                              f"*.safetensors.index.json or a folder")
    return [p]


@dataclass
class KeyMap:
    """Stored keys mapped to model keys (prefix stripped, foreign weights set aside)."""

    refs: dict[str, TensorRef]  # model key -> where the tensor is
    prefix: str
    ignored: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    pickled: Optional[dict[str, torch.Tensor]] = None  # only for explicitly allowed pickle files

    def config_json(self) -> Optional[dict]:
        raw = self.metadata.get("config")
        if not raw:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return None


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
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def scan(source: os.PathLike | str, allow_pickle: bool = False) -> KeyMap:
    """Index every tensor of a source by model key, without reading tensor data."""
    files = resolve_files(source, allow_pickle)
    stored: dict[str, TensorRef] = {}
    metadata: dict[str, str] = {}
    pickled = None
    for f in files:
        if f.suffix in PICKLE_SUFFIXES:
            pickled = _load_pickle(f)
            for k, v in pickled.items():
                stored[k] = TensorRef(f, k, str(v.dtype), tuple(v.shape))
            continue
        h = read_header(f)
        metadata.update(h.metadata)
        stored.update(h.tensors)
    refs, prefix, ignored = map_keys(stored)
    if not refs:
        raise CheckpointError(f"{source}: no transformer weights found (saw {len(stored)} tensors, e.g. "
                              f"{list(stored)[:3]}); is this a VAE or text-encoder file?")
    km = KeyMap(refs, prefix, ignored, metadata)
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
