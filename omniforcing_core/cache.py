"""Per-layer K/V caches for block-by-block generation, one object per stream.

Layout of every buffer: [sink block | slot 0 | slot 1 | ...]. Block 0 (the first block, which is
the attention sink) has its own region; every later block has the same token count and goes into
a slot. With a window of W blocks there are W + 1 slots used as a ring (W history blocks plus the
block being generated), so the valid keys are always a contiguous prefix of the buffer: the
attention reads `buffer[:, :valid]` with no mask and no copy. Attention does not care about key
order, so a ring is exact. The ring is allocated whole at the first write and never moves (fixed
shapes and addresses for a steady block: what CUDA graphs and torch.compile need).

Without a window (keep-all) the slots live in chunks of `CachePolicy.chunk_blocks` slots, each
allocated when the stream reaches it: bytes grow linearly in chunk steps, nothing is reserved for
the whole stream up front, and no block is ever copied. While the stream fits in the first chunk
(which also holds the sink) a block reads one contiguous prefix as with the ring; past it, the
attention reads the chunks one by one and merges them by their log-sum-exp (`layers.KVChunks`).

Four kinds per layer: `video_self` and `v2a` hold video-token keys, `audio_self` and `a2v` hold
audio-token keys (A2V/V2A keys are projected by that layer's cross attention, so they are separate
from the self-attention keys). The cache owns this geometry: `begin_block` says where the block's
K/V go, which blocks it sees and by how much positions shift (`BlockView`); the model builds the
RoPE tables from that (with `rebase_rope` keys are stored un-rotated and rotated at read time with
window-relative positions, so a stream can run past RoPE's 20 s range).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import torch

from .layout import Block, BlockLayout

KINDS = ("video_self", "audio_self", "a2v", "v2a")
VIDEO_KEYED = ("video_self", "v2a")


@dataclass(frozen=True)
class CachePolicy:
    window: Optional[int] = None  # history blocks kept besides the sink block; None keeps everything
    rebase_rope: bool = False
    chunk_blocks: int = 8  # keep-all: slots per allocation chunk (the first chunk also holds the sink)

    def __post_init__(self):
        if self.window is not None and self.window < 1:
            raise ValueError(f"window={self.window}: keep at least 1 history block (or None for no eviction)")
        if self.rebase_rope and self.window is None:
            raise ValueError("rebase_rope needs a window (positions are re-based to the window)")
        if self.chunk_blocks < 1:
            raise ValueError(f"chunk_blocks={self.chunk_blocks}: a chunk holds at least 1 block")

    @property
    def max_slots(self) -> Optional[int]:
        return None if self.window is None else self.window + 1

    def rebase_shift(self, k: int) -> int:
        """Blocks to subtract from block indices >= 1 so the oldest window block sits right after the sink."""
        if not self.rebase_rope or k == 0:
            return 0
        return max(0, k - self.window - 1)


@dataclass(frozen=True)
class BlockView:
    """What one block needs from the cache: where it writes, which keys it reads, and its positions."""

    block: Block
    slot: Optional[int]  # ring slot of the block (None: the sink region of block 0)
    key_blocks: tuple[int, ...]  # the block held by each key region, in buffer order (sink first)
    visible: tuple[bool, ...]  # per key region: seen by this block (False only when re-caching an old block)
    position_shift: int  # blocks subtracted from indices >= 1 for positions (rebase_rope; else 0)
    rebase_rope: bool  # keys are stored un-rotated and rotated at read time with shifted positions

    def position_block(self, index: int) -> int:
        """The block index whose positions block `index` takes."""
        return index - self.position_shift if index else 0

    @property
    def sees_all(self) -> bool:
        return all(self.visible)


class StreamCache:
    """K/V of every layer for one stream (any batch size; CFG streams use batch 2B)."""

    def __init__(self, num_layers: int, layout: BlockLayout, tokens_per_latent: int, dims: dict[str, int],
                 policy: CachePolicy = CachePolicy(), batch: int = 1, device="cpu", dtype=torch.float32):
        self.layout, self.policy = layout, policy
        self.num_layers, self.batch, self.device, self.dtype = num_layers, batch, torch.device(device), dtype
        b0, b1 = layout.block(0), layout.block(1)
        self.sink_len = {k: (b0.video_len * tokens_per_latent if k in VIDEO_KEYED else b0.audio_tokens) for k in KINDS}
        self.slot_len = {k: (b1.video_len * tokens_per_latent if k in VIDEO_KEYED else b1.audio_tokens) for k in KINDS}
        self.dims = dims
        # the first chunk (sink + slots; the whole ring with a window) per layer and kind, and every
        # chunk in order (keep-all streams past the first chunk)
        self.k: list[dict[str, torch.Tensor]] = [dict() for _ in range(num_layers)]
        self.v: list[dict[str, torch.Tensor]] = [dict() for _ in range(num_layers)]
        self.k_chunks: list[dict[str, list[torch.Tensor]]] = [dict() for _ in range(num_layers)]
        self.v_chunks: list[dict[str, list[torch.Tensor]]] = [dict() for _ in range(num_layers)]
        self.slot_blocks: list[int] = []  # block index held by each slot, in buffer order
        self.block: Optional[Block] = None
        self._slot: Optional[int] = None
        self._filled = 0
        self._visible: list[bool] = []
        self._masks: dict[str, torch.Tensor] = {}
        self.head = 0  # newest block begun
        self.on_grow = None  # called with the bytes about to be allocated (memory checks)
        self.itemsize = torch.empty((), dtype=dtype).element_size()  # bytes per K/V element
        self._memo: dict[str, OrderedDict] = {"stream": OrderedDict(), "position": OrderedDict()}
        self._write_idx: dict[str, torch.Tensor] = {}
        self.graphs = None  # CUDA graphs of this stream's steady forwards (model.GraphedForwards), if any

    # -- values a stream derives once (conditioning per sigma, RoPE tables per position) ---------
    MEMO_STREAM = 16  # distinct sigmas a stream's memo holds (a few-step schedule uses 5)

    def memo(self, key, make, keep=None, lifetime: str = "stream"):
        """`make()` once per key for this stream, then the same value. `keep`: objects the key names by
        identity, held with the entry so the identity stays theirs. Bounded: "stream" values (per sigma)
        keep the latest MEMO_STREAM, "position" values (RoPE tables) as many as blocks the window reads."""
        store = self._memo[lifetime]
        if key in store:
            store.move_to_end(key)
            return store[key][0]
        value = make()
        store[key] = (value, keep)
        bound = self.MEMO_STREAM if lifetime == "stream" else (self.policy.max_slots or 0) + 2
        while len(store) > bound:
            store.popitem(last=False)
        return value

    def reserve(self, num_blocks: int) -> None:
        """Nothing to do: a keep-all cache takes its chunks as the stream reaches them (no whole-stream
        reservation, no regrowth copies) and the ring is allocated whole at its first write. Kept for
        callers that announce a known length; `estimate_bytes` gives what that length will take."""

    @property
    def chunk_slots(self) -> int:
        """Slots per chunk: the whole ring with a window, `chunk_blocks` for keep-all."""
        return self.policy.max_slots or self.policy.chunk_blocks

    def _chunk_len(self, kind: str, c: int) -> int:
        return (self.sink_len[kind] if c == 0 else 0) + self.chunk_slots * self.slot_len[kind]

    def _locate(self, kind: str, pos: int) -> tuple[int, int]:
        """Logical key position -> (chunk, offset in it)."""
        first = self._chunk_len(kind, 0)
        if pos < first:
            return 0, pos
        rest = self._chunk_len(kind, 1)
        return 1 + (pos - first) // rest, (pos - first) % rest

    # -- bookkeeping shared by all layers ----------------------------------------------------
    def begin_block(self, block: Block) -> BlockView:
        """Choose where this block's K/V go; call once before the block's forward passes.

        A block older than the newest (a re-cache after a prompt switch) reuses its own slot and
        sees only blocks up to itself, through a key mask.
        """
        self.block = block
        self.head = max(self.head, block.index)
        self._masks = {}
        if block.index == 0:
            self._slot, self._filled, self._visible = None, 0, []
            return self.view()
        j = block.index - 1
        cap = self.policy.max_slots
        self._slot = j if cap is None else j % cap
        while len(self.slot_blocks) <= self._slot:
            self.slot_blocks.append(-1)
        held = self.slot_blocks[self._slot]
        if held > block.index:
            raise ValueError(f"block {block.index} was evicted from the cache (window {self.policy.window}); "
                             f"only blocks still in the window can be re-cached")
        self.slot_blocks[self._slot] = block.index
        self._filled = sum(1 for b in self.slot_blocks if b >= 0)
        self._visible = [b <= block.index for b in self.slot_blocks[: self._filled]]
        if self.steady:
            for kind in KINDS:  # where this block writes, as a device tensor at a fixed address
                s, e = self.write_range(kind)
                idx = self._write_idx.get(kind)
                if idx is None:
                    self._write_idx[kind] = idx = torch.empty(e - s, dtype=torch.long, device=self.device)
                torch.arange(s, e, device=self.device, out=idx)
        return self.view()

    @property
    def steady(self) -> bool:
        """A steady block: the ring is full and every key is visible, so every buffer, every read length and
        every tensor shape is the same as for the previous block; only the write position changes, and it
        is a device tensor (`write_index`). Such a block can be captured once (CUDA graph) or compiled with
        static shapes and replayed for every later block."""
        cap = self.policy.max_slots
        return (cap is not None and self.block is not None and self.block.index > 0 and self._filled == cap
                and all(self._visible))

    def write_index(self, kind: str) -> torch.Tensor:
        """The current (steady) block's key positions in the buffer, on the device."""
        return self._write_idx[kind]

    def static_update(self, layer: int, kind: str, k: torch.Tensor, v: torch.Tensor):
        """`update` for a steady block with no Python value that changes from block to block: the write
        position is a device tensor and the read is the whole ring (what CUDA graphs and torch.compile
        with static shapes need)."""
        kb, vb = self.k[layer][kind], self.v[layer][kind]
        idx = self._write_idx[kind]
        kb.index_copy_(1, idx, k.detach().to(kb.dtype))
        vb.index_copy_(1, idx, v.detach().to(vb.dtype))
        return kb, vb, None

    def view(self) -> BlockView:
        """The current block's view (see `begin_block`)."""
        return BlockView(self.block, self._slot, tuple(self.visible_blocks()), (True, *self._visible),
                         self.policy.rebase_shift(self.head), self.policy.rebase_rope)

    def write_range(self, kind: str) -> tuple[int, int]:
        if self._slot is None:
            return 0, self.sink_len[kind]
        start = self.sink_len[kind] + self._slot * self.slot_len[kind]
        return start, start + self.slot_len[kind]

    def valid_len(self, kind: str) -> int:
        return self.sink_len[kind] + self._filled * self.slot_len[kind]

    def key_mask(self, kind: str) -> Optional[torch.Tensor]:
        """None when every valid key is visible (normal generation); else a bool [valid] mask."""
        if all(self._visible):
            return None
        if kind not in self._masks:
            dev = self.device
            parts = [torch.ones(self.sink_len[kind], dtype=torch.bool, device=dev)]
            parts += [torch.full((self.slot_len[kind],), vis, dtype=torch.bool, device=dev) for vis in self._visible]
            self._masks[kind] = torch.cat(parts)
        return self._masks[kind]

    def visible_blocks(self) -> list[int]:
        """Block indices held by the valid keys, in buffer order (sink first); all of them are
        visible to the current block except, during a re-cache, blocks newer than it (masked)."""
        return [0] + self.slot_blocks[: self._filled]

    def cached_blocks(self) -> list[int]:
        """Every block index the cache holds, oldest first."""
        return [0] + sorted(b for b in self.slot_blocks if b >= 0)

    # -- per layer ----------------------------------------------------------------------------
    def _ensure(self, layer: int, kind: str, chunk: int) -> None:
        """Allocate chunks up to `chunk` (each once; nothing already written ever moves)."""
        have = self.k_chunks[layer].setdefault(kind, [])
        vs = self.v_chunks[layer].setdefault(kind, [])
        while len(have) <= chunk:
            c = len(have)
            shape = (self.batch, self._chunk_len(kind, c), self.dims[kind])
            if self.on_grow is not None:
                self.on_grow(2 * shape[1] * shape[2] * self.batch * self.itemsize)
            have.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
            vs.append(torch.zeros(shape, device=self.device, dtype=self.dtype))
            if c == 0:
                self.k[layer][kind], self.v[layer][kind] = have[0], vs[0]

    def _views(self, layer: int, kind: str, n: int) -> tuple[list, list]:
        """The valid keys [0, n) as one view per chunk."""
        ks, vs = [], []
        c = 0
        while n > 0:
            take = min(n, self._chunk_len(kind, c))
            ks.append(self.k_chunks[layer][kind][c][:, :take])
            vs.append(self.v_chunks[layer][kind][c][:, :take])
            n -= take
            c += 1
        return ks, vs

    def update(self, layer: int, kind: str, k: torch.Tensor, v: torch.Tensor):
        """Write the current block's K/V; return (keys, values, key mask or None) it may attend to: tensors
        when the valid keys are one contiguous prefix, else `KVChunks` (keep-all past its first chunk)."""
        s, e = self.write_range(kind)
        if k.shape[1] != e - s:
            raise ValueError(f"{kind}: got {k.shape[1]} tokens for a block of {e - s}")
        c, off = self._locate(kind, s)
        self._ensure(layer, kind, c)
        kb, vb = self.k_chunks[layer][kind][c], self.v_chunks[layer][kind][c]
        # the buffers never join an autograd graph: history K/V carry no gradient (Self-Forcing)
        kb[:, off:off + e - s] = k.detach().to(kb.dtype)
        vb[:, off:off + e - s] = v.detach().to(vb.dtype)
        n = self.valid_len(kind)
        ks, vs = self._views(layer, kind, n)
        mask = self.key_mask(kind)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # a grad-enabled block (Stage III exit step): attend over a copy [history | current (with
            # grad) | rest], so later in-place writes into the buffers cannot break this backward
            keys, vals = torch.cat(ks, 1), torch.cat(vs, 1)
            keys = torch.cat([keys[:, :s], k.to(kb.dtype), keys[:, e:n]], 1)
            vals = torch.cat([vals[:, :s], v.to(vb.dtype), vals[:, e:n]], 1)
            return keys, vals, mask
        if len(ks) == 1:
            return ks[0], vs[0], mask
        from .layers import KVChunks
        if mask is None:
            return KVChunks(ks, vs), None, None
        # a re-cache: each chunk with its part of the mask; a chunk holding only newer blocks is left out
        # (an all-masked softmax has no value to merge)
        keep_k, keep_v, masks, start, per = [], [], [], 0, self.chunk_slots
        for c, (kc, vc) in enumerate(zip(ks, vs)):
            n = kc.shape[1]
            vis = self._visible[c * per:(c + 1) * per]
            if c == 0 or any(vis):
                keep_k.append(kc)
                keep_v.append(vc)
                masks.append(None if all(vis) else mask[start:start + n])
            start += n
        return KVChunks(keep_k, keep_v, masks), None, None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for store in (self.k_chunks, self.v_chunks) for layer in store
                   for chunks in layer.values() for t in chunks)

    def _slots_after(self, num_blocks: Optional[int]) -> int:
        """Valid slots once `num_blocks` blocks are in (None: the window is full)."""
        if num_blocks is None and self.policy.max_slots is None:
            raise ValueError("an open-ended stream without a window has no final cache size")
        slots = self.policy.max_slots if num_blocks is None else max(0, num_blocks - 1)
        return slots if self.policy.max_slots is None else min(slots, self.policy.max_slots)

    def valid_len_after(self, num_blocks: Optional[int], kind: str) -> int:
        """Keys of `kind` a block reads once `num_blocks` blocks are in (or the window is full)."""
        return self.sink_len[kind] + self._slots_after(num_blocks) * self.slot_len[kind]

    def chunks_after(self, num_blocks: Optional[int]) -> int:
        """Chunks allocated once `num_blocks` blocks are in: the ring is one chunk from the first block on;
        keep-all takes a chunk per `chunk_blocks` slots (the first one with block 0)."""
        if self.policy.max_slots is not None:
            return 1
        return max(1, -(-self._slots_after(num_blocks) // self.chunk_slots))

    def estimate_bytes(self, num_blocks: Optional[int]) -> int:
        """Bytes the buffers take after `num_blocks` blocks (None: once the window is full), for memory
        planning before allocating; exact (whole chunks)."""
        n = self.chunks_after(num_blocks)
        per_layer = sum(sum(self._chunk_len(k, c) for c in range(n)) * self.dims[k] for k in KINDS)
        return 2 * self.num_layers * self.batch * per_layer * self.itemsize
