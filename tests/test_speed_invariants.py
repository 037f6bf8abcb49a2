"""Work the block loop does once, and host round trips it does not make (issue 15, items 1-2).

Counted, not timed: AdaLN MLPs run once per distinct sigma for a whole stream (not per call, not per
block); a steady block's forwards on a device never read host tensors and never sync (run on the `meta`
device, where any host tensor entering a device op is seen and any read of a value raises); dtype casts
per forward do not grow with the number of layers (RoPE tables and AdaLN tables are cast once per block /
per sigma, not per attention call); the fused ops equal their definitions. Speed itself is measured by
`python -m omniforcing_core bench`, never asserted here.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from omniforcing_core.cache import CachePolicy
from omniforcing_core.config import TINY
from omniforcing_core.embedded import random_model, toy_text
from omniforcing_core.layers import AdaLayerNormSingle, gated_add, gelu_tanh, modulate
from omniforcing_core.layout import make_clip, make_layout
from omniforcing_core.rope import RopeConfig, apply_rope, audio_self_table, video_self_table
from omniforcing_core.layout import DEFAULT_TIME
from omniforcing_core.sampling import Sampler
from omniforcing_core.schedule import make_schedule


class _Ops(TorchDispatchMode):
    """Records every ATen op with its tensor arguments' devices and dtypes."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.ops.append((func.overloadpacket.__name__, ins, out))
        return out


def _adaln_calls(model) -> list:
    calls = []
    for m in model.modules():
        if isinstance(m, AdaLayerNormSingle):
            m.register_forward_hook(lambda *a: calls.append(1))
    return calls


@pytest.mark.parametrize("policy", [CachePolicy(), CachePolicy(window=1)])
def test_adaln_runs_once_per_distinct_sigma_for_the_whole_stream(policy):
    """6 AdaLN MLPs x (4 sigmas + the refresh's 0) x 2 block shapes (the 4-latent first block, the 3-latent
    others), however long the stream: 60 calls for 3 blocks and for 6."""
    sched = make_schedule()
    distinct = (len(sched.sigmas) + 1) * 2
    counts = {}
    for n in (3, 6):
        model = random_model(TINY, seed=0)
        calls = _adaln_calls(model)
        clip = make_clip(make_layout("v2"), 64, 96, num_blocks=n)
        with torch.no_grad():
            list(Sampler(model, clip, toy_text(model, "x"), policy=policy))
        counts[n] = len(calls)
    assert counts == {3: 6 * distinct, 6: 6 * distinct}


def test_memoised_conditioning_follows_the_sigma_not_a_stale_entry():
    """The per-sigma memo is keyed by a number's value or a tensor's identity and version: the same
    tensor changed in place, or another value, is computed afresh (equal to a cache that never saw it)."""
    model = random_model(TINY, seed=1, dtype=torch.float64)
    text = toy_text(model, "y")
    clip = make_clip(make_layout("v2"), 64, 96, num_blocks=2)
    v = torch.randn(clip.video_shape(clip.layout.block(0)), dtype=torch.float64)
    a = torch.randn(clip.audio_shape(clip.layout.block(0)), dtype=torch.float64)

    def fresh(sv, sa):
        cache = model.new_cache(clip.layout, clip.grid)
        return model.forward_block(v, a, sv, sa, text, cache, model.prepare_block(cache, clip.layout.block(0),
                                                                                   clip.grid))
    cache = model.new_cache(clip.layout, clip.grid)
    ropes = model.prepare_block(cache, clip.layout.block(0), clip.grid)
    s = torch.full((1,), 0.7)
    first = model.forward_block(v, a, s, s, text, cache, ropes)
    s.fill_(0.3)  # same tensor, new value
    second = model.forward_block(v, a, s, s, text, cache, ropes)
    third = model.forward_block(v, a, 0.3, 0.3, text, cache, ropes)
    assert torch.equal(first[0], fresh(torch.full((1,), 0.7), torch.full((1,), 0.7))[0])
    assert torch.equal(second[0], fresh(torch.full((1,), 0.3), torch.full((1,), 0.3))[0])
    assert torch.equal(third[0], second[0]) and not torch.allclose(first[0], second[0])


def _steady_blocks_on_meta(model, policy, host_table: bool = False):
    """prepare_block + 4 denoising forwards + the refresh of blocks 3..5 on the meta device; returns the
    ops of the steady blocks that read a host (CPU) tensor."""
    clip = make_clip(make_layout("v2"), 64, 96, num_blocks=6)
    text = model.text_kv(torch.zeros(1, 5, 24, device="meta"), torch.zeros(1, 5, 24, device="meta"))
    cache = model.new_cache(clip.layout, clip.grid, policy)
    sig = {n: {s: (torch.full((1, n), s, device="meta"), torch.full((1,), s, device="meta"))
               for s in (*make_schedule().sigmas, 0.0)} for n in (3, 4)}
    rec = _Ops()
    for blk in clip.blocks():
        steady = blk.index >= 3
        if steady:
            rec.__enter__()
        try:
            ropes = model.prepare_block(cache, blk, clip.grid)
            if host_table and steady:  # negative control: a table made on the host and copied over
                ropes.own.audio_self = audio_self_table(range(blk.audio_start, blk.audio_end), 0, DEFAULT_TIME,
                                                        model.config.audio_dim, model.config.audio_heads,
                                                        model.config.rope).to("meta").prepare(torch.float32)
            v = torch.zeros(clip.video_shape(blk), device="meta")
            a = torch.zeros(clip.audio_shape(blk), device="meta")
            for sv, sa in sig[blk.video_len].values():
                model.forward_block(v, a, sv, sa, text, cache, ropes)
        finally:
            if steady:
                rec.__exit__(None, None, None)
    return [name for name, ins, _ in rec.ops if any(t.device.type == "cpu" for t in ins)]


@pytest.mark.parametrize("policy", [CachePolicy(), CachePolicy(window=2), CachePolicy(window=2, rebase_rope=True)])
def test_a_steady_block_reads_no_host_tensor_and_never_syncs(policy):
    """On a device, RoPE tables, sigmas and masks of a steady block are made there: no op of blocks 3-5
    takes a host tensor (which would be a host-to-device copy on a GPU), and nothing reads a value back
    (a meta tensor has none: `.item()`, `bool()` or a data-dependent shape would raise)."""
    with torch.no_grad():
        model = random_model(TINY, seed=0, device="meta")
        assert _steady_blocks_on_meta(model, policy) == []
        # the detector sees a host table copied in
        assert "_to_copy" in _steady_blocks_on_meta(model, policy, host_table=True)


def _casts_per_forward(config) -> int:
    model = random_model(config, seed=0, dtype=torch.bfloat16)
    clip = make_clip(make_layout("v2"), 64, 96, num_blocks=3)
    text = toy_text(model, "z")
    cache = model.new_cache(clip.layout, clip.grid)
    v = torch.randn(clip.video_shape(clip.layout.block(1)))
    a = torch.randn(clip.audio_shape(clip.layout.block(1)))
    with torch.no_grad():
        for blk in list(clip.blocks())[:2]:
            ropes = model.prepare_block(cache, blk, clip.grid)
        s = torch.full((1,), 0.5)
        model.forward_block(v, a, s, s, text, cache, ropes)  # the memo is warm now
        rec = _Ops()
        with rec:
            model.forward_block(v, a, s, s, text, cache, ropes)
    # casts of tensors that existed before the forward (tables, parameters, inputs), not of the
    # forward's own intermediates (CPU rms_norm computes bf16 in float32 internally)
    made, casts = set(), 0
    for name, ins, out in rec.ops:
        if name in ("_to_copy", "to") and ins[0].untyped_storage().data_ptr() not in made:
            casts += 1
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                made.add(t.untyped_storage().data_ptr())
    return casts


def test_dtype_casts_per_forward_do_not_grow_with_layers():
    """bf16 compute: the only casts of existing tensors in a warm forward are the two float32 latents
    coming in, however many layers (RoPE tables were cast once per block, AdaLN tables once per sigma,
    weights are stored in bf16)."""
    two, eight = _casts_per_forward(TINY), _casts_per_forward(TINY.replace(num_layers=8))
    assert two == eight == 2


# -- fused ops equal their definitions -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gelu_tanh_equals_its_definition(dtype):
    x = torch.linspace(-12, 12, 4001, dtype=torch.float64)
    want = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    got = gelu_tanh(x.to(dtype)).double()
    tol = 1e-6 if dtype == torch.float32 else 1e-14
    assert (got - want).abs().max().item() <= tol * max(1.0, want.abs().max().item())
    assert torch.equal(gelu_tanh(x.to(torch.bfloat16)), F.gelu(x.to(torch.bfloat16), approximate="tanh"))


def test_modulate_and_gated_add_equal_their_definitions_per_sample_and_per_frame():
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 12, 8, generator=g, dtype=torch.float64), torch.randn(2, 12, 8, generator=g,
                                                                                   dtype=torch.float64)
    for frames in (1, 3):  # per sample, per frame (4 tokens per frame)
        sh, sc, gate = (torch.randn(2, frames, 8, generator=g, dtype=torch.float64) for _ in range(3))
        per_token = lambda t: t.repeat_interleave(12 // frames, 1)  # noqa: E731
        assert torch.allclose(modulate(x, sh, 1 + sc, 12 // frames), x * (1 + per_token(sc)) + per_token(sh),
                              atol=1e-14)
        assert torch.allclose(gated_add(x, out, gate, 12 // frames), x + per_token(gate) * out, atol=1e-14)


@pytest.mark.parametrize("kind", ["interleaved", "split"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_prepared_rope_equals_the_rotation(kind, dtype):
    """Prepared tables (complex factor, or cos + signed sin) rotate as the definition: each pair (or
    head half) (a, b) -> (a cos - b sin, b cos + a sin)."""
    tab = video_self_table(range(3), (2, 3), DEFAULT_TIME, 96, 2, RopeConfig(kind))
    x = torch.randn(2, tab.length, 96, dtype=torch.float64)
    c, s = tab.cos.double(), tab.sin.double()
    if kind == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        want = torch.stack([a * c[:, 0::2] - b * s[:, 0::2], b * c[:, 0::2] + a * s[:, 0::2]], -1).flatten(-2)
    else:
        xs = x.view(2, tab.length, 2, 2, -1)
        a, b = xs[..., 0, :], xs[..., 1, :]
        want = torch.stack([a * c - b * s, b * c + a * s], -2).reshape(x.shape)
    got = apply_rope(x.to(dtype), tab.prepare(dtype)).double()
    tol = {torch.float32: 1e-5, torch.float64: 1e-13, torch.bfloat16: 5e-2}[dtype]
    assert (got - want).abs().max().item() < tol


# -- static steady blocks: one compiled graph, replayable CUDA graphs ------------------------------------

def _rolling(model, text, n, runtime=None, prepare=None):
    from omniforcing_core.model import Runtime
    clip = make_clip(make_layout("v2"), 64, 96, num_blocks=n, seed=2)
    s = Sampler(model, clip, text, policy=CachePolicy(window=2), runtime=runtime or Runtime())
    if prepare is not None:
        prepare(s)
    with torch.no_grad():
        blocks = list(s)
    return torch.cat([b.video for b in blocks], 2), torch.cat([b.audio for b in blocks], 2)


def test_steady_blocks_trace_to_one_static_graph_without_breaks(monkeypatch):
    """torch.compile(fullgraph=True) of a steady block's forward: one graph for every steady forward of the
    stream (4 sigmas + the refresh, 5 blocks: the write position is a device tensor, not a constant), and
    the same values as the eager loop (float64)."""
    from omniforcing_core import model as M
    graphs = []

    def backend(gm, inputs):
        graphs.append(len(gm.graph.nodes))
        return gm.forward
    torch._dynamo.reset()
    monkeypatch.setitem(M._COMPILED, "body", torch.compile(M.OmniForcingTransformer._body, dynamic=False,
                                                           fullgraph=True, backend=backend))
    model = random_model(TINY, seed=0, dtype=torch.float64)
    text = toy_text(model, "x")
    v, a = _rolling(model, text, 8, M.Runtime(compile=True))
    ev, ea = _rolling(model, text, 8)
    assert len(graphs) == 1
    assert (v - ev).abs().max().item() < 1e-12 and (a - ea).abs().max().item() < 1e-12
    torch._dynamo.reset()


def test_graph_replays_refresh_their_inputs_one_graph_per_sigma(monkeypatch):
    """The CUDA-graph runner's bookkeeping, with a stand-in capture that replays by re-running the captured
    function on its static inputs (what a CUDA graph does): one capture per distinct sigma, every later
    steady forward a replay with the new latents, RoPE tables and write positions, outputs equal to eager."""
    from omniforcing_core import model as M
    captures, replays = [], []

    def capture(fn, static):
        out = fn(*static)
        captures.append(1)

        def replay():
            replays.append(1)
            for o, n in zip(out, fn(*static)):
                o.copy_(n)
        return replay, out
    monkeypatch.setattr(M.Runtime, "check", lambda self, device: None)  # no CUDA here
    model = random_model(TINY, seed=0, dtype=torch.float64)
    text = toy_text(model, "x")

    def with_runner(s):
        s.backend.cache.graphs = M.GraphedForwards(capture)
    v, a = _rolling(model, text, 8, M.Runtime(cuda_graphs=True), with_runner)
    ev, ea = _rolling(model, text, 8)
    assert len(captures) == len(make_schedule().sigmas) + 1  # one per sigma (the refresh's 0 included)
    assert len(replays) == 5 * 5  # blocks 3..7 are steady, 5 forwards each
    assert (v - ev).abs().max().item() < 1e-12 and (a - ea).abs().max().item() < 1e-12


def test_cuda_graphs_need_a_cuda_device():
    from omniforcing_core.model import Runtime
    model = random_model(TINY, seed=0)
    with pytest.raises(ValueError, match="cuda_graphs needs a CUDA device"):
        _rolling(model, toy_text(model, "x"), 5, Runtime(cuda_graphs=True))


def test_fused_linear_gelu_equals_the_layer_then_gelu():
    """The CPU float32 GEMM with GELU in its epilogue equals Linear then GELU-tanh (float rounding), and is
    not used where it could be wrong: float64, gradients, layers that are not a plain Linear."""
    from omniforcing_core.layers import linear_gelu_tanh
    from omniforcing_core.ops import Linear
    g = torch.Generator().manual_seed(0)
    lin = Linear(32, 96)
    x = torch.randn(2, 7, 32, generator=g)
    want = 0.5 * (y := F.linear(x.double(), lin.weight.double(), lin.bias.double())) * (
        1 + torch.tanh(math.sqrt(2 / math.pi) * (y + 0.044715 * y ** 3)))
    with torch.no_grad():
        assert (linear_gelu_tanh(lin, x).double() - want).abs().max().item() < 1e-5
        assert (linear_gelu_tanh(lin.double(), x.double()) - want).abs().max().item() < 1e-12
    out = linear_gelu_tanh(lin, x.requires_grad_())
    out.sum().backward()  # the training path keeps autograd
    assert x.grad is not None and (out.detach().double() - want).abs().max().item() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_steady_block_on_cuda_makes_no_synchronising_call():
    """On a GPU: prepare_block and the 5 forwards of steady blocks run under
    torch.cuda.set_sync_debug_mode("error") - any host-device copy or value read back raises."""
    with torch.no_grad():
        model = random_model(TINY, seed=0, device="cuda")
        clip = make_clip(make_layout("v2"), 64, 96, num_blocks=6)
        text = model.text_kv(torch.zeros(1, 5, 24, device="cuda"), torch.zeros(1, 5, 24, device="cuda"))
        cache = model.new_cache(clip.layout, clip.grid, CachePolicy(window=2))
        sig = {n: [(torch.full((1, n), s, device="cuda"), torch.full((1,), s, device="cuda"))
                   for s in (*make_schedule().sigmas, 0.0)] for n in (3, 4)}
        for blk in clip.blocks():
            v = torch.zeros(clip.video_shape(blk), device="cuda")
            a = torch.zeros(clip.audio_shape(blk), device="cuda")
            steady = blk.index >= 3
            torch.cuda.set_sync_debug_mode("error" if steady else "default")
            try:
                ropes = model.prepare_block(cache, blk, clip.grid)
                for sv, sa in sig[blk.video_len]:
                    model.forward_block(v, a, sv, sa, text, cache, ropes)
            finally:
                torch.cuda.set_sync_debug_mode("default")


def test_with_gradients_the_conditioning_is_made_afresh_and_reaches_the_adaln_weights():
    """The per-sigma memo serves inference only: a grad-enabled forward at a sigma the stream has already
    seen without gradients still sends gradient to the AdaLN MLPs and the layers' tables."""
    model = random_model(TINY, seed=4)
    text = toy_text(model, "grad")
    clip = make_clip(make_layout("v2"), 64, 96, num_blocks=1)
    b0 = clip.layout.block(0)
    v, a = torch.randn(clip.video_shape(b0)), torch.randn(clip.audio_shape(b0))
    cache = model.new_cache(clip.layout, clip.grid)
    ropes = model.prepare_block(cache, b0, clip.grid)
    s = torch.full((1,), 0.7)
    with torch.no_grad():
        model.forward_block(v, a, s, s, text, cache, ropes)  # the memo now holds sigma 0.7
    model.requires_grad_(True)
    out = model.forward_block(v, a, s, s, text, cache, ropes)
    (out[0].square().mean() + out[1].square().mean()).backward()
    for p in (model.adaln_single.linear.weight, model.transformer_blocks[0].scale_shift_table,
              model.av_ca_v2a_gate_adaln_single.linear.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
