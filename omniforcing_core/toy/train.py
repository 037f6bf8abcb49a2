"""The training entry point of the toy recipe.

`Runner(cfg, run_dir).run()` trains one stage with progress lines, periodic checkpoints
(`ckpt.safetensors`: every module as `<name>.<key>`, every optimiser state as `optim.<name>.<i>.<key>`;
`state.json`: config, step, optimiser hyper-parameters, metrics, wall time) and resumes from the
run dir when one exists. Launched under `torchrun` (WORLD_SIZE > 1) it initialises
torch.distributed, gives every rank its own data/noise stream, averages gradients (DDP), or shards
the trainable models with FSDP2 (`fully_shard` per transformer block, then the root) when
`cfg.fsdp` is set (the helpers live in `distributed.py`). Both run here on CPU with gloo
(`torchrun --nproc_per_node 2 -m omniforcing_core.toy train ... --run-dir DIR`, tested); NCCL on
GPUs is the same code, not run here.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .configs import StageConfig
from .distributed import current_rank, dist_env, is_dtensor, is_sharded, shard_model
from .stages import STAGES, Stage


# -- checkpoints -------------------------------------------------------------------------------------

def _full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict; for an FSDP module a collective every rank must join."""
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return module.state_dict()


def save_checkpoint(run_dir: Path, stage: Stage, step: int, metrics: list, wall_s: float) -> None:
    """Every rank calls this (FSDP gathers the full weights collectively); rank 0 writes the weights
    and the state. With FSDP each rank also writes its own optimiser shards (`optim.rank<r>.safetensors`):
    weights stay portable, an optimiser resumes with the same number of ranks."""
    rank = current_rank()
    sharded = any(is_sharded(m) for m in stage.modules().values())
    if rank != 0 and not sharded:
        return  # nothing to gather, nothing to write
    tensors, optim, groups = {}, {}, {}
    for name, mod in stage.modules().items():
        for k, v in _full_state(mod).items():
            tensors[f"{name}.{k}"] = v.detach().contiguous().cpu()
    for name, opt in stage.optimizers().items():
        sd = opt.state_dict()
        for pid, st in sd["state"].items():
            for k, v in st.items():
                t = v if torch.is_tensor(v) else torch.tensor(v)
                t = t.to_local() if is_dtensor(t) else t
                optim[f"optim.{name}.{pid}.{k}"] = t.detach().contiguous().cpu()
        groups[name] = sd["param_groups"]
    if sharded:
        _atomic_save(optim, run_dir / f"optim.rank{rank}.safetensors", step)
    else:
        tensors.update(optim)
    if rank != 0:
        return
    state = {"stage": stage.cfg.stage, "step": step, "config": stage.cfg.to_dict(), "param_groups": groups,
             "metrics": metrics[-2000:], "wall_s": wall_s, "format": 1, "sharded_optimizer": sharded}
    _atomic_save(tensors, run_dir / "ckpt.safetensors", step, stage.cfg.stage)
    (run_dir / "state.json.tmp").write_text(json.dumps(state, indent=1))
    os.replace(run_dir / "state.json.tmp", run_dir / "state.json")


def _atomic_save(tensors: dict, path: Path, step: int, stage: str = "") -> None:
    from safetensors.torch import save_file
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"stage": stage, "step": str(step)})
    os.replace(tmp, path)


def load_checkpoint(run_dir: Path, stage: Stage) -> dict:
    from safetensors.torch import load_file
    state = json.loads((run_dir / "state.json").read_text())
    t = load_file(str(run_dir / "ckpt.safetensors"))
    if state.get("sharded_optimizer"):
        t.update(load_file(str(run_dir / f"optim.rank{current_rank()}.safetensors")))
    for name, mod in stage.modules().items():
        pre = name + "."
        sd = {k[len(pre):]: v for k, v in t.items() if k.startswith(pre)}
        if is_sharded(mod):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
            set_model_state_dict(mod, sd, options=StateDictOptions(full_state_dict=True, strict=True))
        else:
            mod.load_state_dict(sd, strict=True)
    for name, opt in stage.optimizers().items():
        pre = f"optim.{name}."
        params = [p for gr in opt.param_groups for p in gr["params"]]
        st: dict = {}
        for k, v in t.items():
            if k.startswith(pre):
                pid, key = k[len(pre):].split(".", 1)
                p = params[int(pid)]
                if is_dtensor(p) and v.dim() > 0:  # a saved local shard: back onto the param's mesh
                    from torch.distributed.tensor import DTensor
                    v = DTensor.from_local(v.to(p.device), p.device_mesh, p.placements, run_check=False,
                                           shape=p.shape, stride=p.stride())
                st.setdefault(int(pid), {})[key] = v
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in gr.items()} for gr in state["param_groups"][name]]
        opt.load_state_dict({"state": st, "param_groups": groups})
    return state


# -- runner ------------------------------------------------------------------------------------------

class Runner:
    def __init__(self, cfg: StageConfig, run_dir, *, resume: bool = True, log: Callable[[str], None] = print):
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.rank, self.world, self.device = dist_env()
        self.log = log if self.rank == 0 else (lambda s: None)

    def run(self, max_steps: Optional[int] = None) -> dict:
        """Train until `cfg.steps` (or `max_steps` more steps); returns the last metrics."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.stage not in STAGES:
            raise ValueError(f"stage '{cfg.stage}' is not a training stage; use {', '.join(STAGES)}")
        torch.manual_seed(cfg.seed)
        stage = STAGES[cfg.stage](cfg, self.rank, self.world, self.device)
        if self.world > 1 and cfg.fsdp:
            for name in ("model", "critic", "ema"):  # the EMA shadow follows the model's sharding
                if getattr(stage, name, None) is not None:
                    shard_model(getattr(stage, name), cfg.mixed_precision)
            stage.make_optimizers()  # over the sharded parameters FSDP put in place
        start, metrics, wall0 = 0, [], 0.0
        if self.resume and (self.run_dir / "state.json").exists():
            st = load_checkpoint(self.run_dir, stage)
            start, metrics, wall0 = st["step"], st["metrics"], st["wall_s"]
            self.log(f"[{cfg.stage}] resumed at step {start} from {self.run_dir}")
        (self.run_dir / "config.json").write_text(cfg.to_json())
        end = cfg.steps if max_steps is None else min(cfg.steps, start + max_steps)
        t0 = time.perf_counter()
        last, recent = {}, {}
        for i in range(start, end):
            last = stage.step(i)
            last["step"] = i
            metrics.append(last)
            recent.update({k: v for k, v in last.items() if isinstance(v, float) and v == v})
            done = i + 1
            if done % cfg.log_every == 0 or done == end:
                el = time.perf_counter() - t0
                per = el / (done - start)
                txt = " ".join(f"{k} {v:.4g}" for k, v in recent.items())  # newest value of every metric
                self.log(f"[{cfg.stage}] step {done}/{cfg.steps} {txt} | {per:.2f} s/step, "
                         f"eta {per * (cfg.steps - done):.0f} s")
            if done % cfg.save_every == 0 or done == end:  # every rank: FSDP gathers collectively
                save_checkpoint(self.run_dir, stage, done, metrics, wall0 + time.perf_counter() - t0)
        self.stage = stage
        return last


def summarize(metrics: list, key: str = "loss", window: int = 50) -> dict:
    vals = [m[key] for m in metrics if key in m and m[key] == m[key]]
    if not vals:
        return {}
    gn = [m.get("grad_norm", m.get("gen_grad_norm", float("nan"))) for m in metrics]
    gn = [g for g in gn if g == g]
    head = sum(vals[:window]) / len(vals[:window])
    tail = sum(vals[-window:]) / len(vals[-window:])
    return {"first": head, "last": tail, "max_grad_norm": max(gn) if gn else float("nan"),
            "finite": all(math.isfinite(v) for v in vals)}


__all__ = ["Runner", "save_checkpoint", "load_checkpoint", "summarize"]
