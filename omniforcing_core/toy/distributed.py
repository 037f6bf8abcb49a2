"""torch.distributed for the toy training: process group from torchrun's environment, FSDP2 sharding,
gradient averaging and global-norm clipping, and the checks both the stages and the runner need.

The stages call `clip_gradients`, the runner (`train.py`, which imports the stages) the rest; so
`stages` needs nothing from `train`. Single-process runs never initialise torch.distributed.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def dist_env() -> tuple[int, int, str]:
    """(rank, world, device) from torchrun's environment; (0, 1, cpu|cuda) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, f"cuda:{local}"
    return rank, world, "cpu"


def shutdown() -> None:
    """End a torchrun job together: every rank waits for the others (a rank that exits while a peer is
    still in a collective resets its connection and aborts it), then the process group is destroyed."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def current_rank() -> int:
    """This process's rank in the initialised process group; 0 without one."""
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_sharded(module: torch.nn.Module) -> bool:
    return any(type(m).__name__.startswith("FSDP") for m in module.modules())


def is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def shard_model(model: torch.nn.Module, mixed_precision: Optional[str] = None) -> torch.nn.Module:
    """FSDP2: one unit per transformer block plus the root (LTX-2 19B: 48 blocks of ~0.39 B params).
    Block calls go through `__call__`, so the per-block hooks fire on both the masked full path and
    the KV-cached block path; the methods called directly (below) are registered as forward methods."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if mixed_precision == "bf16" else MixedPrecisionPolicy()
    for blk in model.transformer_blocks:
        fully_shard(blk, mp_policy=mp)
        register_fsdp_forward_method(blk, "text_key_values")
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    # the samplers call these model methods directly, not forward: FSDP must gather for them too
    for name in ("text_kv", "encode_text", "forward_block"):
        register_fsdp_forward_method(model, name)
    return model


def average_gradients(params, world: int) -> None:
    """DDP without the wrapper (the Sampler calls model methods, not forward): all-reduce grads."""
    if world <= 1:
        return
    import torch.distributed as dist
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def clip_gradients(params, max_norm: float, world: int) -> float:
    """Average what DDP-style training leaves unreduced, then clip by the global norm.

    FSDP reduces (and shards) the gradients of its own modules; every other parameter (e.g. the
    caption encoder beside a sharded transformer) is all-reduced here. Plain single-process and
    DDP runs take torch's `clip_grad_norm_` unchanged."""
    params = [p for p in params if p.grad is not None]
    sharded = [p for p in params if is_dtensor(p.grad)]
    plain = [p for p in params if not is_dtensor(p.grad)]
    average_gradients(plain, world)
    limit = max_norm if max_norm > 0 else float("inf")
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(params, limit))
    import torch.distributed as dist
    # shards are disjoint across ranks: sum their squares everywhere; replicated grads count once
    sq = sum(p.grad.to_local().float().pow(2).sum() for p in sharded)
    dist.all_reduce(sq)
    sq = sq.cpu() + sum((p.grad.float().pow(2).sum().cpu() for p in plain), torch.zeros(()))
    total = float(sq.sqrt())
    if total > limit:
        coef = limit / (total + 1e-6)
        for p in params:
            p.grad.mul_(coef)
    return total


__all__ = ["dist_env", "current_rank", "is_sharded", "is_dtensor", "shard_model", "average_gradients", "clip_gradients"]
