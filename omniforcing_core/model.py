"""The OmniForcing dual-stream transformer (LTX-2 19B parameter names and shapes).

The module holds weights only. Two forward paths share every layer:
  * `forward` runs a whole sequence under the four block-causal masks (the reference), or
    bidirectionally with `layout=None`;
  * `forward_block` runs one block against a `StreamCache` (inference): each layer writes the
    block's K/V into the cache and attends to everything the cache holds, with no mask.
Latents cross the boundary in the native LTX-2 layout: video [B, 128, F, H/32, W/32], audio
[B, 8, T, 16]; sigmas are per latent frame ([B, F] / [B, T]) or per sample ([B]). Returns
velocities in the same layout.
How the layers run where the references differ (RoPE tables, cross-modal gate timesteps, the V->A
normalisation order, q/k-norm epsilon) is `config.conventions` (see `config.Conventions`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .cache import BlockView, StreamCache
from .config import ModelConfig
from .layers import (AdaLayerNormSingle, Attention, AttentionFn, FeedForward, TextProjection, _param, gated_add,
                     modulate, rms, sdpa_attention)
from .layout import Block, BlockLayout, DEFAULT_TIME, TimeBase
from .masks import Masks, cached_masks
from .ops import default_ops
from .rope import (PreparedRope, RopeTable, apply_rope, audio_cross_table, audio_self_table, cat_tables,
                   video_cross_table, video_self_table)
from .text import TextKV


_FIELDS = ("video_self", "audio_self", "video_cross", "audio_cross")


@dataclass
class Ropes:
    """RoPE tables for the tokens of one forward (a block or the whole sequence): `RopeTable`s as
    built, or `PreparedRope`s (cast to the compute dtype once, see `prepare`)."""

    video_self: RopeTable | PreparedRope
    audio_self: RopeTable | PreparedRope
    video_cross: RopeTable | PreparedRope
    audio_cross: RopeTable | PreparedRope

    def query(self, kind: str) -> RopeTable:
        return {"video_self": self.video_self, "audio_self": self.audio_self,
                "a2v": self.video_cross, "v2a": self.audio_cross}[kind]

    def key(self, kind: str) -> RopeTable:
        return {"video_self": self.video_self, "audio_self": self.audio_self,
                "a2v": self.audio_cross, "v2a": self.video_cross}[kind]

    def to(self, device, dtype=None) -> "Ropes":
        return Ropes(*(t.to(device, dtype) for t in (self.video_self, self.audio_self, self.video_cross,
                                                    self.audio_cross)))

    def prepare(self, dtype: torch.dtype) -> "Ropes":
        """Every table in the form `apply_rope` uses at `dtype` (one cast per forward or block, not per call)."""
        return Ropes(*(getattr(self, f).prepare(dtype) for f in _FIELDS))

    @staticmethod
    def cat(parts: list["Ropes"]) -> "Ropes":
        return Ropes(*(cat_tables([getattr(p, f) for p in parts]) for f in _FIELDS))


def sigma_rows(sigma, b: int, n: int, device) -> torch.Tensor:
    """A sigma (number, [B] or [B, F]) as float32 rows: [B, 1] when it is one per sample (broadcast over
    the frames), [B, F] per latent frame. A number is filled on the device, never copied from the host."""
    if isinstance(sigma, (int, float)):
        return torch.full((b, 1), float(sigma), dtype=torch.float32, device=device)
    s = sigma.to(device=device, dtype=torch.float32)
    if s.dim() == 0:
        return s.expand(b)[:, None]
    if s.dim() == 1:
        if s.shape[0] != b:
            raise ValueError(f"sigma shape {tuple(s.shape)} does not match [B={b}]")
        return s[:, None]
    if s.shape != (b, n):
        raise ValueError(f"sigma shape {tuple(s.shape)} does not match [B={b}, frames={n}]")
    return s


def sigma_key(sigma):
    """A memo key for a sigma: its value for a number, the identity and version of a tensor (no device
    read: the tensor is kept alive with the memo entry, and an in-place change bumps its version)."""
    if isinstance(sigma, (int, float)):
        return ("value", float(sigma))
    if sigma.is_inference():  # no version counter (ComfyUI runs nodes in inference mode); never changed in place
        return ("tensor", id(sigma), None)
    return ("tensor", id(sigma), sigma._version)


@dataclass(frozen=True)
class Runtime:
    """How to run the weights, kept apart from them: the attention kernel, the compute dtype (None:
    the model's), and whether the video and audio halves of a layer run on two CUDA streams at once
    (the paper's asymmetric parallel inference; a no-op on CPU, same result either way)."""

    attn_fn: AttentionFn = sdpa_attention
    compute_dtype: Optional[torch.dtype] = None
    parallel_modalities: bool = False
    # steady blocks (a full rolling window: fixed shapes, see StreamCache.steady) run compiled with
    # torch.compile (static shapes, one graph for every steady forward) and/or replayed as CUDA graphs
    # (one per sigma per stream); every other forward runs eagerly. Both off by default (bench.py).
    compile: bool = False
    cuda_graphs: bool = False

    def dtype_of(self, model: "OmniForcingTransformer") -> torch.dtype:
        return self.compute_dtype or model.dtype

    def check(self, device: torch.device) -> None:
        if self.cuda_graphs and torch.device(device).type != "cuda":
            raise ValueError(f"cuda_graphs needs a CUDA device, the model is on {device}; turn it off "
                             f"(compile works on any device)")
        if self.cuda_graphs and self.parallel_modalities:
            raise ValueError("cuda_graphs capture one stream: turn parallel_modalities off with it")


_STREAMS: dict = {}  # device -> (video stream, audio stream), made once


def _pair_streams(rt: Runtime, device: torch.device):
    if not rt.parallel_modalities or device.type != "cuda":
        return None
    if device not in _STREAMS:
        _STREAMS[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _STREAMS[device]


@dataclass
class BlockRopes:
    """The RoPE tables of one cached block: its queries' (and, with absolute positions, its keys'),
    and with `rebase_rope` the tables of every visible key, applied when the cache is read."""

    own: Ropes
    read: Optional[Ropes] = None


class _Attention:
    """What a layer needs to attend: the kernel, the ropes, where keys come from, and how the two
    modalities' halves run (one after the other, or on two CUDA streams)."""

    def __init__(self, runtime: Runtime, device: torch.device):
        self.attn_fn = runtime.attn_fn
        self.streams = _pair_streams(runtime, device)

    def pair(self, fv, xv, fa, xa):
        if self.streams is None:
            return fv(xv), fa(xa)
        sv, sa = self.streams
        cur = torch.cuda.current_stream()
        sv.wait_stream(cur)
        sa.wait_stream(cur)
        with torch.cuda.stream(sv):
            ov = fv(xv)
        with torch.cuda.stream(sa):
            oa = fa(xa)
        cur.wait_stream(sv)
        cur.wait_stream(sa)
        ov.record_stream(cur)  # memory made on a side stream is used on the main one
        oa.record_stream(cur)
        return ov, oa


class FullAttention(_Attention):
    """Whole sequence: rotate keys, attend under the block-causal mask (or none)."""

    def __init__(self, masks: Optional[Masks], ropes: Ropes, runtime: Runtime, device):
        super().__init__(runtime, device)
        self.masks, self.ropes = masks, ropes

    def keys(self, layer: int, kind: str, k, v):
        mask = None if self.masks is None else self.masks.get(kind)
        return apply_rope(k, self.ropes.key(kind)), v, mask


class CachedAttention(_Attention):
    """One block: write K/V into the stream cache and attend to all it holds (no mask needed).
    `static`: a steady block written through device-tensor positions (`StreamCache.static_update`)."""

    def __init__(self, cache: StreamCache, ropes: BlockRopes, runtime: Runtime, device, static: bool = False):
        super().__init__(runtime, device)
        self.cache, self.ropes, self.block_ropes, self.static = cache, ropes.own, ropes, static

    def keys(self, layer: int, kind: str, k, v):
        read = self.block_ropes.read
        if read is None:  # absolute positions: store rotated keys
            k = apply_rope(k, self.ropes.key(kind))
        update = self.cache.static_update if self.static else self.cache.update
        k, v, mask = update(layer, kind, k, v)
        if read is not None:  # re-based positions (a window: one contiguous ring): rotate every visible key now
            k = apply_rope(k, read.key(kind))
        return k, v, mask


@dataclass
class Conditioning:
    """Per-frame AdaLN values of one forward."""

    v_mod: torch.Tensor  # [B, Fv, 6, Dv]
    a_mod: torch.Tensor  # [B, Na, 6, Da]
    v_cross: torch.Tensor  # [B, Fv, 4, Dv]
    a_cross: torch.Tensor  # [B, Na, 4, Da]
    v_gate: torch.Tensor  # [B, Fv, Dv], or [B, 1, Dv] when the gate follows the other modality per sample
    a_gate: torch.Tensor  # [B, Na, Da], or [B, 1, Da]
    v_emb: torch.Tensor  # [B, Fv, Dv] embedded timestep for the output head
    a_emb: torch.Tensor  # [B, Na, Da]
    tpf: int  # video tokens per latent frame


@dataclass
class LayerMods:
    """One layer's AdaLN values for one sigma: its tables + the conditioning, with 1 + scale taken once.
    Rows are per sample ([B, 1, D], broadcast over the tokens) or per latent frame ([B, F, D])."""

    v_attn: tuple  # (shift, 1 + scale, gate) of video self-attention
    v_ff: tuple
    a_attn: tuple
    a_ff: tuple
    v_a2v: tuple  # (shift, 1 + scale) of the video side of A2V (queries)
    v_v2a: tuple  # ... of V2A (keys)
    a_a2v: tuple
    a_v2a: tuple
    gate_a2v: torch.Tensor
    gate_v2a: torch.Tensor


@dataclass
class StepConditioning:
    """Everything a forward derives from its sigmas alone, made once per distinct sigma: the AdaLN values,
    the output heads' (shift, 1 + scale) and every layer's modulation values. A layer's are made by the
    layer inside its own forward (where FSDP has gathered its tables) the first time, and kept when no
    autograd graph hangs on them (`keep`; with gradients they are made afresh at every call)."""

    base: Conditioning
    layers: list  # LayerMods per layer, None until that layer has run
    v_out: tuple
    a_out: tuple
    keep: bool = True

    def layer(self, i: int, blk: "DualStreamBlock", dt: torch.dtype) -> LayerMods:
        m = self.layers[i]
        if m is None:
            m = blk.modulation(self.base, dt)
            if self.keep:
                self.layers[i] = m
        return m


class DualStreamBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, ops, dtype=None, device=None):
        super().__init__()
        dv, da, dc = cfg.video_dim, cfg.audio_dim, cfg.cross_dim
        kw = dict(ops=ops, eps=cfg.qk_norm_eps, dtype=dtype, device=device)  # q/k norms: a convention
        self.eps = cfg.norm_eps  # the parameter-free pre-norms
        self.v2a_after_a2v = cfg.v2a_norm == "after-a2v"
        self.attn1 = Attention(dv, dv, cfg.video_heads, cfg.video_head_dim, **kw)
        self.attn2 = Attention(dv, dv, cfg.video_heads, cfg.video_head_dim, **kw)
        self.audio_attn1 = Attention(da, da, cfg.audio_heads, cfg.audio_head_dim, **kw)
        self.audio_attn2 = Attention(da, da, cfg.audio_heads, cfg.audio_head_dim, **kw)
        # cross-modal attentions use the audio head geometry
        self.audio_to_video_attn = Attention(dv, da, cfg.audio_heads, dc // cfg.audio_heads, **kw)
        self.video_to_audio_attn = Attention(da, dv, cfg.audio_heads, dc // cfg.audio_heads, **kw)
        self.ff = FeedForward(dv, cfg.ff_mult, ops, dtype, device)
        self.audio_ff = FeedForward(da, cfg.ff_mult, ops, dtype, device)
        self.scale_shift_table = _param((6, dv), dtype, device, dv ** -0.5)
        self.audio_scale_shift_table = _param((6, da), dtype, device, da ** -0.5)
        self.scale_shift_table_a2v_ca_video = _param((5, dv), dtype, device, dv ** -0.5)
        self.scale_shift_table_a2v_ca_audio = _param((5, da), dtype, device, da ** -0.5)

    def text_key_values(self, video_text: torch.Tensor, audio_text: torch.Tensor):
        """This layer's text cross-attention K/V (a method of its own so FSDP can gather the block for it)."""
        return self.attn2.key_value(video_text), self.audio_attn2.key_value(audio_text)

    def _attend(self, attn: Attention, xq, xkv, kind, layer, ctx):
        """Self (xkv is xq) or cross-modal attention with positions; keys go through `ctx` (cache or mask)."""
        q = attn.query(xq, ctx.ropes.query(kind))
        k, v = attn.key_value(xkv)
        k, v, mask = ctx.keys(layer, kind, k, v)
        return attn.output(q, k, v, mask, ctx.attn_fn)

    def _text(self, attn: Attention, x, kv, mask, ctx):
        return attn.output(attn.query(x, None), kv[0], kv[1], mask, ctx.attn_fn)

    def modulation(self, c: Conditioning, dt: torch.dtype) -> LayerMods:
        """This layer's AdaLN values for a conditioning (depends on the sigmas only: made once per sigma)."""
        v_sh, v_sc, v_g, v_sh2, v_sc2, v_g2 = (self.scale_shift_table.to(dt) + c.v_mod).unbind(2)
        a_sh, a_sc, a_g, a_sh2, a_sc2, a_g2 = (self.audio_scale_shift_table.to(dt) + c.a_mod).unbind(2)
        tv = self.scale_shift_table_a2v_ca_video.to(dt)
        ta = self.scale_shift_table_a2v_ca_audio.to(dt)
        v_sc_a2v, v_sh_a2v, v_sc_v2a, v_sh_v2a = (tv[:4] + c.v_cross).unbind(2)
        a_sc_a2v, a_sh_a2v, a_sc_v2a, a_sh_v2a = (ta[:4] + c.a_cross).unbind(2)
        return LayerMods((v_sh, 1 + v_sc, v_g), (v_sh2, 1 + v_sc2, v_g2), (a_sh, 1 + a_sc, a_g),
                         (a_sh2, 1 + a_sc2, a_g2), (v_sh_a2v, 1 + v_sc_a2v), (v_sh_v2a, 1 + v_sc_v2a),
                         (a_sh_a2v, 1 + a_sc_a2v), (a_sh_v2a, 1 + a_sc_v2a), tv[4] + c.v_gate, ta[4] + c.a_gate)

    def forward(self, xv, xa, cond: StepConditioning, tpf: int, text: TextKV, layer: int, ctx):
        eps = self.eps
        m = cond.layer(layer, self, xv.dtype)

        def video_attn(xv):
            sh, sc, g = m.v_attn
            h = modulate(rms(xv, eps), sh, sc, tpf)
            xv = gated_add(xv, self._attend(self.attn1, h, h, "video_self", layer, ctx), g, tpf)
            return xv + self._text(self.attn2, rms(xv, eps), text.video[layer], text.mask, ctx)

        def audio_attn(xa):
            sh, sc, g = m.a_attn
            h = modulate(rms(xa, eps), sh, sc, 1)
            xa = gated_add(xa, self._attend(self.audio_attn1, h, h, "audio_self", layer, ctx), g, 1)
            return xa + self._text(self.audio_attn2, rms(xa, eps), text.audio[layer], text.mask, ctx)

        xv, xa = ctx.pair(video_attn, xv, audio_attn, xa)

        # cross-modal: A2V reads the states normalised before either update; V2A reads the same ones
        # (ltx-causal, ltx-core: the two directions run in parallel) or, with v2a_norm "after-a2v"
        # (ComfyUI 783545f6), the video re-normalised after the A2V update
        nv, na = rms(xv, eps), rms(xa, eps)

        def a2v(xv):
            out = self._attend(self.audio_to_video_attn, modulate(nv, *m.v_a2v, tpf), modulate(na, *m.a_a2v, 1),
                               "a2v", layer, ctx)
            return gated_add(xv, out, m.gate_a2v, tpf)

        def v2a(xa, nv=nv):
            out = self._attend(self.video_to_audio_attn, modulate(na, *m.a_v2a, 1), modulate(nv, *m.v_v2a, tpf),
                               "v2a", layer, ctx)
            return gated_add(xa, out, m.gate_v2a, 1)

        if self.v2a_after_a2v:
            xv = a2v(xv)
            xa = v2a(xa, rms(xv, eps))
        else:
            xv, xa = ctx.pair(a2v, xv, v2a, xa)

        def video_ff(xv):
            sh, sc, g = m.v_ff
            return gated_add(xv, self.ff(modulate(rms(xv, eps), sh, sc, tpf)), g, tpf)

        def audio_ff(xa):
            sh, sc, g = m.a_ff
            return gated_add(xa, self.audio_ff(modulate(rms(xa, eps), sh, sc, 1)), g, 1)

        return ctx.pair(video_ff, xv, audio_ff, xa)


class OmniForcingTransformer(nn.Module):
    def __init__(self, config: ModelConfig, operations=None, dtype=None, device=None, time: TimeBase = DEFAULT_TIME):
        super().__init__()
        ops = operations or default_ops
        cfg = self.config = config
        self.time = time
        dv, da = cfg.video_dim, cfg.audio_dim
        kw = dict(dtype=dtype, device=device)
        self.patchify_proj = ops.Linear(cfg.in_channels, dv, **kw)
        self.audio_patchify_proj = ops.Linear(cfg.audio_in_channels, da, **kw)
        self.adaln_single = AdaLayerNormSingle(dv, 6, ops, **kw)
        self.audio_adaln_single = AdaLayerNormSingle(da, 6, ops, **kw)
        self.av_ca_video_scale_shift_adaln_single = AdaLayerNormSingle(dv, 4, ops, **kw)
        self.av_ca_audio_scale_shift_adaln_single = AdaLayerNormSingle(da, 4, ops, **kw)
        self.av_ca_a2v_gate_adaln_single = AdaLayerNormSingle(dv, 1, ops, **kw)
        self.av_ca_v2a_gate_adaln_single = AdaLayerNormSingle(da, 1, ops, **kw)
        self.caption_projection = TextProjection(cfg.caption_channels, dv, ops, **kw)
        self.audio_caption_projection = TextProjection(cfg.caption_channels, da, ops, **kw)
        self.transformer_blocks = nn.ModuleList(DualStreamBlock(cfg, ops, **kw) for _ in range(cfg.num_layers))
        self.scale_shift_table = _param((2, dv), dtype, device, dv ** -0.5)
        self.audio_scale_shift_table = _param((2, da), dtype, device, da ** -0.5)
        self.proj_out = ops.Linear(dv, cfg.in_channels, **kw)
        self.audio_proj_out = ops.Linear(da, cfg.audio_in_channels, **kw)
        if cfg.num_audio_sinks:
            self.audio_sink_tokens = _param((1, cfg.num_audio_sinks, da), dtype, device, 0.02)
        if cfg.connectors is not None:
            from .connectors import TextConnector
            self.video_embeddings_connector = TextConnector(cfg.connectors, ops, **kw)
            self.audio_embeddings_connector = TextConnector(cfg.connectors, ops, **kw)
            for conn in (self.video_embeddings_connector, self.audio_embeddings_connector):
                for blk in conn.transformer_1d_blocks:  # the q/k-norm epsilon is a convention here too
                    blk.attn1.q_norm.eps = blk.attn1.k_norm.eps = cfg.qk_norm_eps

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype it computes in by default: its tables' (the loader stores every non-Linear
        tensor in the compute dtype; Linear weights may be stored narrower, e.g. fp8)."""
        return self.scale_shift_table.dtype

    @property
    def device(self) -> torch.device:
        return self.scale_shift_table.device

    @property
    def num_sinks(self) -> int:
        return self.config.num_audio_sinks

    def check_layout(self, layout: BlockLayout) -> None:
        if layout.num_sinks != self.num_sinks:
            raise ValueError(f"the model has {self.num_sinks} audio sink tokens but the layout '{layout.kind}' has "
                             f"{layout.num_sinks}; use make_layout('prefix', num_sinks={self.num_sinks})"
                             if self.num_sinks else
                             f"the layout has {layout.num_sinks} sink tokens but the model has none; use num_sinks=0")

    # -- text ------------------------------------------------------------------------------------
    def encode_text(self, features: torch.Tensor, mask: Optional[torch.Tensor] = None, runtime: Runtime = Runtime()):
        """Raw (aggregated) Gemma features [B, L, 3840] -> (video_context, audio_context) via the connectors."""
        if self.config.connectors is None:
            raise ValueError("this model has no text connectors; pass contexts that already went through them "
                             "(ComfyUI's LTX-2 text encoder output) or load a checkpoint with "
                             "video_embeddings_connector.* keys")
        x = features.to(runtime.dtype_of(self))
        return self.video_embeddings_connector(x, mask), self.audio_embeddings_connector(x, mask)

    def text_kv(self, video_context: torch.Tensor, audio_context: torch.Tensor,
                mask: Optional[torch.Tensor] = None, runtime: Runtime = Runtime()) -> TextKV:
        """Project the text once per prompt and compute every layer's cross-attention K/V."""
        dt = runtime.dtype_of(self)
        pv = self.caption_projection(video_context.to(self.device, dt))
        pa = self.audio_caption_projection(audio_context.to(self.device, dt))
        video, audio = zip(*(blk.text_key_values(pv, pa) for blk in self.transformer_blocks))
        video, audio = list(video), list(audio)
        add = None
        if mask is not None and not bool(mask.all()):
            keep = mask.to(self.device).bool()[:, None, None, :]
            add = torch.zeros(keep.shape, dtype=dt, device=self.device).masked_fill(~keep, torch.finfo(dt).min)
        return TextKV(video, audio, add)

    # -- rope --------------------------------------------------------------------------------------
    def ropes_for(self, video_latents: range, audio_latents: range, grid_hw: tuple[int, int], sinks: int) -> Ropes:
        """The RoPE tables of these latents, built on the model's device (no host round trip)."""
        cfg, t, dev = self.config, self.time, self.device
        tpl = grid_hw[0] * grid_hw[1]
        return Ropes(
            video_self_table(video_latents, grid_hw, t, cfg.video_dim, cfg.video_heads, cfg.rope, dev),
            audio_self_table(audio_latents, sinks, t, cfg.audio_dim, cfg.audio_heads, cfg.rope, dev),
            video_cross_table(video_latents, tpl, t, cfg.cross_dim, cfg.audio_heads, cfg.rope, dev),
            audio_cross_table(audio_latents, sinks, t, cfg.cross_dim, cfg.audio_heads, cfg.rope, dev),
        )

    def _block_ropes(self, b: Block, grid_hw) -> Ropes:
        return self.ropes_for(range(b.video_start, b.video_end), range(b.audio_start, b.audio_end), grid_hw, b.sinks)

    def prepare_block(self, cache: StreamCache, block: Block, grid_hw: tuple[int, int],
                      dtype: Optional[torch.dtype] = None) -> BlockRopes:
        """Start a block in the cache and build its RoPE tables from the cache's view of it, prepared for
        the compute dtype (default: the cache's) once for the block's forwards. The tables of each position
        are built once per stream (the cache keeps them while the block is in it)."""
        dt = dtype or cache.dtype
        view: BlockView = cache.begin_block(block)
        layout = cache.layout

        def tables(j: int) -> Ropes:
            return cache.memo(("rope", j, tuple(grid_hw)),
                              lambda: self._block_ropes(layout.block(j), grid_hw), lifetime="position")

        own = tables(view.position_block(block.index)).prepare(dt)
        if not view.rebase_rope:
            return BlockRopes(own)
        read = Ropes.cat([tables(view.position_block(j)) for j in view.key_blocks]).prepare(dt)
        return BlockRopes(own, read)

    # -- forward -----------------------------------------------------------------------------------
    def _conditioning(self, video_sigma, audio_sigma, sinks: int, tpf: int, dt: torch.dtype,
                      rows: Optional[tuple[int, int]] = None) -> Conditioning:
        """AdaLN values of per-frame sigmas ([B, F]) or per-sample ones ([B, 1]). `rows` = (video frames, audio
        tokens incl. sinks) of the forward: per-sample sigmas are evaluated one row per frame all the same,
        because a matrix multiply rounds each row by its position and a sigma given per sample must give the
        bits of the same sigma given per frame. The block loop makes this once per distinct sigma for the
        whole stream (`forward_block` memoises it in the cache), so the rows cost nothing per call."""
        cfg = self.config
        one_v, one_a = video_sigma.shape[1] == 1, audio_sigma.shape[1] == 1
        if rows is not None:
            video_sigma = video_sigma.expand(-1, rows[0]) if one_v else video_sigma
            audio_sigma = audio_sigma.expand(-1, rows[1]) if one_a else audio_sigma
        if sinks and audio_sigma.shape[1] != (rows[1] if rows is not None else -1):
            # sink tokens take the first audio frame's timestep
            audio_sigma = torch.cat([audio_sigma[:, :1].expand(-1, sinks), audio_sigma], 1)
        ts = cfg.timestep_scale_multiplier
        vt, at = video_sigma * ts, audio_sigma * ts  # [B, Fv], [B, Na] (float32, as every reference scales)
        v_mod, v_emb = self.adaln_single(vt, dt)
        a_mod, a_emb = self.audio_adaln_single(at, dt)
        v_cross, _ = self.av_ca_video_scale_shift_adaln_single(vt, dt)
        a_cross, _ = self.av_ca_audio_scale_shift_adaln_single(at, dt)
        # the gate AdaLN sees (sigma * ts) * (av_ca / ts), the op order of all three references; whose
        # sigma is the `gate_timestep` convention
        if cfg.gate_timestep == "own":  # each modality's own per-frame sigma (ltx-causal)
            v_in, a_in = vt, at
        elif cfg.gate_timestep == "other-sample":  # the other modality's per-sample sigma (ltx-core)
            v_in, a_in = at.amax(1, keepdim=True), vt.amax(1, keepdim=True)
        else:  # "other-max": the other modality's maximum over the whole batch (ComfyUI 783545f6)
            b = vt.shape[0]
            v_in, a_in = at.amax().expand(b, 1), vt.amax().expand(b, 1)
        factor = cfg.av_ca_timestep_scale_multiplier / ts
        v_gate, _ = self.av_ca_a2v_gate_adaln_single(v_in * factor, dt)
        a_gate, _ = self.av_ca_v2a_gate_adaln_single(a_in * factor, dt)
        return Conditioning(v_mod, a_mod, v_cross, a_cross, v_gate[:, :, 0], a_gate[:, :, 0], v_emb, a_emb, tpf)

    def step_conditioning(self, video_sigma: torch.Tensor, audio_sigma: torch.Tensor, sinks: int,
                          dt: torch.dtype, rows: tuple[int, int]) -> StepConditioning:
        """Every layer's modulation values and the output heads' for these sigma rows ([B, F] or [B, 1]);
        rows: (video frames, audio tokens incl. sinks) of the forward (see `_conditioning`)."""
        c = self._conditioning(video_sigma, audio_sigma, sinks, 0, dt, rows)
        sh, sc = (self.scale_shift_table.to(dt)[None, None] + c.v_emb[:, :, None]).unbind(2)
        ash, asc = (self.audio_scale_shift_table.to(dt)[None, None] + c.a_emb[:, :, None]).unbind(2)
        return StepConditioning(c, [None] * len(self.transformer_blocks), (sh, 1 + sc), (ash, 1 + asc),
                                keep=not torch.is_grad_enabled())

    def _conditioning_for(self, video, audio, video_sigma, audio_sigma, sinks: int, dt: torch.dtype,
                          memo: Optional[StreamCache] = None) -> StepConditioning:
        b, f, t_a = video.shape[0], video.shape[2], audio.shape[2]
        vs = sigma_rows(video_sigma, b, f, video.device)
        as_ = sigma_rows(audio_sigma, b, t_a, video.device)
        rows = (f, t_a + sinks)
        if memo is None or torch.is_grad_enabled():  # (training: a fresh graph to the AdaLN weights each call)
            return self.step_conditioning(vs, as_, sinks, dt, rows)
        # made once per distinct sigma for the whole stream
        key = ("cond", sigma_key(video_sigma), sigma_key(audio_sigma), b, rows, sinks, dt)
        return memo.memo(key, lambda: self.step_conditioning(vs, as_, sinks, dt, rows), keep=(video_sigma, audio_sigma))

    def _body(self, video, audio, cond: StepConditioning, text: TextKV, ctx, sinks: int, dt: torch.dtype):
        """Patchify, the layers, the output heads: tensors in, tensors out (what compile / CUDA graphs take)."""
        b, c, f, h, w = video.shape
        t_a = audio.shape[2]
        xv = self.patchify_proj(video.to(dt).permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c))
        xa = self.audio_patchify_proj(audio.to(dt).permute(0, 2, 1, 3).reshape(b, t_a, -1))
        if sinks:
            xa = torch.cat([self.audio_sink_tokens.to(dt).expand(b, -1, -1), xa], 1)
        tpf = h * w
        for i, blk in enumerate(self.transformer_blocks):
            xv, xa = blk(xv, xa, cond, tpf, text, i, ctx)
        eps = self.config.norm_eps
        yv = self.proj_out(modulate(F.layer_norm(xv, (xv.shape[-1],), eps=eps), *cond.v_out, tpf))
        ya = self.audio_proj_out(modulate(F.layer_norm(xa, (xa.shape[-1],), eps=eps), *cond.a_out, 1))[:, sinks:]
        yv = yv.view(b, f, h, w, -1).permute(0, 4, 1, 2, 3)
        ya = ya.view(b, t_a, audio.shape[1], audio.shape[3]).permute(0, 2, 1, 3)
        return yv, ya

    def _run(self, video, audio, video_sigma, audio_sigma, text: TextKV, ctx, sinks: int, dt: torch.dtype,
             memo: Optional[StreamCache] = None):
        cond = self._conditioning_for(video, audio, video_sigma, audio_sigma, sinks, dt, memo)
        return self._body(video, audio, cond, text, ctx, sinks, dt)

    def forward(self, video, audio, video_sigma, audio_sigma, text: TextKV,
                layout: Optional[BlockLayout] = None, window: Optional[int] = None, runtime: Runtime = Runtime()):
        """Whole sequence. With a layout: block-causal masks (reference path); None: bidirectional.
        `window` hides blocks older than that many blocks before each query's, except the sink block."""
        f, t_a = video.shape[2], audio.shape[2]
        grid = (video.shape[3], video.shape[4])
        sinks = self.num_sinks
        masks = None
        if layout is not None:
            self.check_layout(layout)
            masks = cached_masks(layout, f, t_a, grid[0] * grid[1], str(video.device), window)
        dt = runtime.dtype_of(self)
        ropes = self.ropes_for(range(f), range(t_a), grid, sinks).prepare(dt)
        ctx = FullAttention(masks, ropes, runtime, self.device)
        return self._run(video, audio, video_sigma, audio_sigma, text, ctx, sinks, dt)

    def forward_block(self, video, audio, video_sigma, audio_sigma, text: TextKV, cache: StreamCache,
                      ropes: BlockRopes, runtime: Runtime = Runtime()):
        """One block (the one `prepare_block` started) against the stream cache. Sigmas: a number, per
        sample [B] or per latent frame [B, F]; the conditioning of each distinct sigma is made once per
        stream (kept by the cache, keyed by the number, or by the identity of the tensor)."""
        blk = cache.block
        if video.shape[2] != blk.video_len or audio.shape[2] != blk.audio_len:
            raise ValueError(f"block {blk.index} holds {blk.video_len} video / {blk.audio_len} audio latents, "
                             f"got {video.shape[2]} / {audio.shape[2]}")
        dt = runtime.dtype_of(self)
        static = (runtime.compile or runtime.cuda_graphs) and cache.steady and not torch.is_grad_enabled()
        if not static:
            ctx = CachedAttention(cache, ropes, runtime, self.device)
            return self._run(video, audio, video_sigma, audio_sigma, text, ctx, blk.sinks, dt, memo=cache)
        runtime.check(self.device)
        cond = self._conditioning_for(video, audio, video_sigma, audio_sigma, blk.sinks, dt, cache)
        body = compiled_body() if runtime.compile else OmniForcingTransformer._body

        def run(video, audio, ropes):
            ctx = CachedAttention(cache, ropes, runtime, self.device, static=True)
            return body(self, video, audio, cond, text, ctx, blk.sinks, dt)
        if not runtime.cuda_graphs:
            return run(video, audio, ropes)
        if cache.graphs is None:
            cache.graphs = GraphedForwards()
        key = (id(cond), id(text), tuple(video.shape), tuple(audio.shape), runtime.compile)
        return cache.graphs.run(key, run, video, audio, ropes, keep=(cond, text))

    def new_cache(self, layout: BlockLayout, grid_hw: tuple[int, int], policy=None, batch: int = 1,
                  dtype: Optional[torch.dtype] = None) -> StreamCache:
        from .cache import CachePolicy
        self.check_layout(layout)
        cfg = self.config
        dims = {"video_self": cfg.video_dim, "audio_self": cfg.audio_dim, "a2v": cfg.cross_dim, "v2a": cfg.cross_dim}
        return StreamCache(cfg.num_layers, layout, grid_hw[0] * grid_hw[1], dims, policy or CachePolicy(), batch,
                           self.device, dtype or self.dtype)


# -- static steady blocks: torch.compile and CUDA graphs ---------------------------------------------

_COMPILED: dict = {}


def compiled_body():
    """`OmniForcingTransformer._body` under torch.compile with static shapes, made once per process; a
    steady block has one set of shapes, so every steady forward of a stream replays one graph (parameters
    are graph inputs, so models of one architecture share it)."""
    if "body" not in _COMPILED:
        _COMPILED["body"] = torch.compile(OmniForcingTransformer._body, dynamic=False)
    return _COMPILED["body"]


def _rope_tensors(ropes: BlockRopes) -> list:
    parts = [ropes.own] + ([ropes.read] if ropes.read is not None else [])
    return [t for r in parts for f in _FIELDS for t in getattr(r, f).tensors()]


def _with_rope_tensors(ropes: BlockRopes, tensors: list) -> BlockRopes:
    it = iter(tensors)

    def rebuild(r: Ropes) -> Ropes:
        return Ropes(*(getattr(r, f).with_tensors(it) for f in _FIELDS))
    return BlockRopes(rebuild(ropes.own), None if ropes.read is None else rebuild(ropes.read))


class GraphedForwards:
    """CUDA graphs of one stream's steady forwards, one per key (a sigma's conditioning and the prompt),
    sharing one memory pool (they replay one at a time). The graph reads the cache buffers, the block's
    write positions and every conditioning tensor at fixed addresses; the latents and the block's RoPE
    tables are copied into its static inputs before each replay."""

    def __init__(self, capture=None):
        self.entries: dict = {}
        self.pool = None
        self._capture = capture or self._cuda_capture  # (fn, static inputs) -> (replay, static outputs)

    def _cuda_capture(self, fn, static):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (the writes are the ones the call makes anyway)
            fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn(*static)
        self.pool = graph.pool()
        return graph.replay, out

    def run(self, key, run, video, audio, ropes: BlockRopes, keep=()):
        tensors = [video, audio, *_rope_tensors(ropes)]
        entry = self.entries.get(key)
        if entry is None:
            static = [t.clone() for t in tensors]

            def fn(v, a, *rt):
                return run(v, a, _with_rope_tensors(ropes, list(rt)))
            replay, out = self._capture(fn, static)
            entry = self.entries[key] = (replay, static, out, keep)
        replay, static, out, _ = entry
        for dst, src in zip(static, tensors):
            dst.copy_(src)
        replay()
        return tuple(o.clone() for o in out)
