"""The ring cache's promises, stated on the cache alone (no model): where each block's K/V go, what
each block reads, eviction, re-cache masks, positions under rebase_rope, and bytes."""
import pytest
import torch

from omniforcing_core.cache import KINDS, CachePolicy, StreamCache
from omniforcing_core.layout import make_layout

LAYOUT = make_layout("v2")
TPL = 2  # video tokens per latent frame
DIMS = {k: 4 for k in KINDS}


def new_cache(window=None, rebase=False, layers=1):
    return StreamCache(layers, LAYOUT, TPL, DIMS, CachePolicy(window, rebase), batch=1, dtype=torch.float64)


def write(cache, block_index, layer=0):
    """Begin a block and write K = V = its index into every kind; return what each kind reads back."""
    view = cache.begin_block(LAYOUT.block(block_index))
    out = {}
    for kind in KINDS:
        s, e = cache.write_range(kind)
        k = torch.full((1, e - s, 4), float(block_index), dtype=torch.float64)
        out[kind] = cache.update(layer, kind, k, k)
    return view, out


def blocks_read(keys: torch.Tensor, mask=None) -> list[int]:
    """The block indices present in a read, in buffer order (one per run of equal keys)."""
    vals = keys[0, :, 0]
    if mask is not None:
        vals = vals[mask]
    runs = []
    for v in vals.tolist():
        if not runs or runs[-1] != int(v):
            runs.append(int(v))
    return runs


@pytest.mark.parametrize("window", [1, 2, 4])
def test_ring_reads_sink_plus_last_window_blocks(window):
    cache = new_cache(window)
    for k in range(12):
        view, reads = write(cache, k)
        want = sorted({0, *range(max(1, k - window), k + 1)})
        for kind, (keys, vals, mask) in reads.items():
            assert mask is None
            assert sorted(blocks_read(keys)) == want, (k, kind)
            assert torch.equal(keys, vals)
        assert sorted(view.key_blocks) == want and view.sees_all
        # the slot is (k - 1) mod (W + 1): a ring, block 0 in its own region
        assert view.slot == (None if k == 0 else (k - 1) % (window + 1))


def test_valid_keys_are_a_contiguous_prefix_and_the_block_reads_its_own_keys():
    cache = new_cache(window=2)
    for k in range(7):
        _, reads = write(cache, k)
        for kind in KINDS:
            keys = reads[kind][0]
            s, e = cache.write_range(kind)
            assert keys.shape[1] == cache.valid_len(kind) >= e  # nothing past the valid prefix is read
            assert (keys[:, s:e] == k).all()


def test_window_at_least_length_never_evicts():
    full, roll = new_cache(None), new_cache(window=20)
    for k in range(8):
        _, a = write(full, k)
        _, b = write(roll, k)
        for kind in KINDS:
            assert blocks_read(a[kind][0]) == blocks_read(b[kind][0]) == list(range(k + 1))


def test_recache_of_an_old_block_reuses_its_slot_and_masks_newer_blocks():
    cache = new_cache(window=3)
    slots = {}
    for k in range(5):
        view, _ = write(cache, k)
        slots[k] = view.slot
    view, reads = write(cache, 2)  # a prompt switch re-encodes block 2 in place
    assert view.slot == slots[2] and not view.sees_all
    for kind, (keys, _, mask) in reads.items():
        assert mask is not None
        assert sorted(blocks_read(keys, mask)) == [0, 1, 2]  # only blocks up to itself
        assert sorted(blocks_read(keys)) == [0, 1, 2, 3, 4]  # the newer keys stay in the buffer
    with pytest.raises(ValueError, match="evicted"):
        c = new_cache(window=1)
        for k in range(4):
            write(c, k)
        write(c, 1)  # block 1 left the window long ago


def test_rebase_shift_keeps_positions_inside_the_window():
    cache = new_cache(window=2, rebase=True)
    for k in range(9):
        view, _ = write(cache, k)
        positions = sorted(view.position_block(j) for j in view.key_blocks)
        assert positions == list(range(len(positions)))  # sink at 0, then 1..W+1 whatever k is
        assert view.position_block(k) == positions[-1]
    plain = new_cache(window=2)
    view, _ = write(plain, 0)
    for k in range(1, 9):
        view, _ = write(plain, k)
    assert view.position_shift == 0 and view.position_block(8) == 8  # negative control: absolute


def test_bytes_flat_once_full_and_estimate_is_exact():
    cache = new_cache(window=2, layers=2)
    sizes = []
    for k in range(8):
        for layer in range(2):
            cache.begin_block(LAYOUT.block(k))
            for kind in KINDS:
                s, e = cache.write_range(kind)
                cache.update(layer, kind, torch.zeros(1, e - s, 4, dtype=torch.float64),
                             torch.zeros(1, e - s, 4, dtype=torch.float64))
        sizes.append(cache.nbytes())
    assert len(set(sizes)) == 1  # the ring is allocated whole at the first write (fixed addresses)
    assert cache.estimate_bytes(8) == cache.estimate_bytes(1) == sizes[-1]
    assert new_cache(window=2, layers=2).estimate_bytes(100) == sizes[-1]  # flat in the length


def test_wrong_token_count_is_refused():
    cache = new_cache(window=2)
    cache.begin_block(LAYOUT.block(1))
    with pytest.raises(ValueError, match="tokens for a block of"):
        cache.update(0, "video_self", torch.zeros(1, 5, 4), torch.zeros(1, 5, 4))


def test_a_stream_that_cannot_fit_is_refused_before_allocating(monkeypatch):
    """Keep-all for a huge length, and a huge frame, fail at once with the numbers and the fix."""
    from omniforcing_core import budget
    from omniforcing_core.config import TINY
    from omniforcing_core.embedded import random_model
    from omniforcing_core.layout import Clip
    from omniforcing_core.sampling import Sampler
    from omniforcing_core.schedule import make_schedule

    model = random_model(TINY)
    text = model.text_kv(torch.zeros(1, 2, TINY.caption_channels), torch.zeros(1, 2, TINY.caption_channels))
    free = budget.HEADROOM + 64 * 2 ** 20
    monkeypatch.setattr(budget, "available_bytes", lambda device: free)  # 64 MiB above the headroom
    with pytest.raises(budget.ResourceError, match=r"needs .* GiB .*free.*rolling window"):
        Sampler(model, Clip(LAYOUT, 64, 64, 36000), text)  # 10 h keep-all
    with pytest.raises(budget.ResourceError, match="smaller frame"):
        Sampler(model, Clip(LAYOUT, 32 * 3000, 32 * 3000, 5), text, policy=CachePolicy(window=2))
    s = Sampler(model, Clip(LAYOUT, 64, 64, 36000), text, policy=CachePolicy(window=2))  # a window fits
    assert budget.stream_bytes(model, s.clip, CachePolicy(window=2), 1, torch.float32) < free
    # an open-ended keep-all stream grows until the next growth would not fit: free memory shrinks
    # by what the cache has taken, as it does on a real device
    holder = []
    monkeypatch.setattr(budget, "available_bytes",
                        lambda device: budget.HEADROOM + 2 ** 20 - (holder[0].backend.cache.nbytes() if holder else 0))
    s = Sampler(model, Clip(LAYOUT, 64, 64, None), text, schedule=make_schedule([1000, 0]))
    holder.append(s)
    blocks = 0
    with pytest.raises(budget.ResourceError, match="growing the keep-all KV cache"):
        for _ in s:
            blocks += 1
            assert blocks < 200, "the keep-all cache grew past the free memory without an error"
    assert s.backend.cache.nbytes() <= 2 ** 20 < budget.stream_bytes(model, Clip(LAYOUT, 64, 64, blocks + 2),
                                                                     CachePolicy(), 1, torch.float32)


# -- keep-all: fixed chunks, no reservation, no copies -------------------------------------------------

def test_keep_all_grows_in_fixed_chunks_linearly_and_never_copies_a_block():
    """Chunks of 2 blocks: bytes step up by the same amount every 2 blocks (and equal the estimate at every
    length), nothing is allocated ahead of the stream, the storage holding each written block never
    moves and keeps its values, and a read past the first chunk returns the chunks in order."""
    cache = StreamCache(1, LAYOUT, TPL, DIMS, CachePolicy(chunk_blocks=2), batch=1, dtype=torch.float64)
    cache.reserve(1000)  # a known length reserves nothing
    sizes, where = [], {}
    for k in range(9):
        view, reads = write(cache, k)
        sizes.append(cache.nbytes())
        assert sizes[-1] == cache.estimate_bytes(k + 1)
        chunk, off = cache._locate("video_self", cache.write_range("video_self")[0])
        where[k] = cache.k_chunks[0]["video_self"][chunk][:, off:].data_ptr()
        for j, ptr in where.items():  # every earlier block still at its address with its values
            c, o = cache._locate("video_self", cache.sink_len["video_self"] + (j - 1) * cache.slot_len["video_self"]
                                 if j else 0)
            buf = cache.k_chunks[0]["video_self"][c]
            assert buf[:, o:].data_ptr() == ptr and (buf[:, o:o + (cache.slot_len["video_self"] if j
                                                                     else cache.sink_len["video_self"])] == j).all()
        keys = reads["video_self"][0]
        if k <= 2:  # inside the first chunk: one contiguous prefix, as with the ring
            assert isinstance(keys, torch.Tensor) and blocks_read(keys) == list(range(k + 1))
        else:
            assert blocks_read(torch.cat(keys.keys, 1)) == list(range(k + 1))
    steps = [b - a for a, b in zip(sizes, sizes[1:]) if b != a]
    assert [k for k in range(1, 9) if sizes[k] != sizes[k - 1]] == [3, 5, 7] and len(set(steps)) == 1
    assert sizes[0] == cache.estimate_bytes(1) < cache.estimate_bytes(1000)  # nothing reserved up front


def test_on_grow_hears_each_chunk_once_before_it_is_allocated():
    cache = StreamCache(2, LAYOUT, TPL, DIMS, CachePolicy(chunk_blocks=3), batch=1, dtype=torch.float32)
    heard = []
    cache.on_grow = lambda n: heard.append((n, cache.nbytes()))
    for k in range(8):
        for layer in range(2):
            write(cache, k, layer)
    # 3 chunks (blocks 0-3, 4-6, 7-9) x 2 layers x 4 kinds, each announced with the bytes it adds
    assert len(heard) == 3 * 2 * 4 and sum(n for n, _ in heard) == cache.nbytes() == cache.estimate_bytes(8)
