"""The OmniForcing stages on the project's own model code.

* `TeacherStage`  - bidirectional flow matching (x_t = (1-s) x0 + s eps, target v = eps - x0) of the
                    dual-stream transformer and the caption encoder.
* `make_ode_pairs` - teacher Euler trajectories on LTX-2's shifted 40-step grid with CFG, stored at
                    the student's sigmas (1.0, 0.906, 0.727, 0.421, 0).
* `CausalStage`   - Stage II causal ODE regression: per block a trajectory index (uniform inside a
                    block), the full masked sequence (`model.forward(..., layout)`), x0 loss on noisy
                    frames. Audio noise levels follow the block table (`audio_sigma_mapping="block"`);
                    "proportional" reproduces the official code's mapping (reference section 8.2).
* `DMDStage`      - Stage III Self-Forcing DMD: the generator rolls out with the real KV cache through
                    `sampling.Sampler` (exit step with gradient, history detached, clean cache refresh),
                    the distribution-matching gradient of a frozen CFG teacher vs a trainable critic,
                    critic trained by flow matching on generator samples.
Every random draw of a step comes from a generator seeded by (seed, stage, step, rank), so a run is
deterministic for its seed and a resumed run continues bit-exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..flow import euler_step, guide, noisy, predict_x0, x0_from_velocity
from ..layout import BlockLayout, make_layout
from ..layout import make_clip as layout_clip
from ..modality import AV
from ..model import OmniForcingTransformer
from ..noise import _mix
from ..sampling import Given, Sampler
from ..schedule import ltx2_sigma_grid, make_schedule
from .configs import StageConfig
from .distributed import clip_gradients
from .textenc import TextEncoder


def step_generator(cfg: StageConfig, step: int, rank: int = 0, salt: str = "") -> torch.Generator:
    return torch.Generator().manual_seed(_mix(cfg.seed, cfg.stage, step, rank, salt))


def randn(shape, g: torch.Generator, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=g).to(device)


# -- data ---------------------------------------------------------------------------------------------

def load_latents(path) -> dict:
    from safetensors.torch import load_file
    p = Path(path)
    t = load_file(str(p / "latents.safetensors"))
    meta = json.loads((p / "latents.json").read_text())
    return {"video": t["video"].float(), "audio": t["audio"].float(), "captions": meta["captions"],
            "events": meta.get("events"), "seeds": meta.get("seeds")}


def build_dataset(out, codecs, n: int, seed: int = 0, seconds: int = 2, size: int = 128, log=print,
                  keep_events: bool = True) -> Path:
    """Render `n` world clips (seeds seed..seed+n-1), encode them with the codecs, store latents (fp16)."""
    from safetensors.torch import save_file
    from .world import make_clip
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vids, auds, caps, evs, seeds = [], [], [], [], []
    with torch.no_grad():
        for i in range(n):
            c = make_clip(seed + i, seconds, size)
            vids.append(codecs.video.encode(c.video[None]).half())
            auds.append(codecs.audio.encode(c.audio[None]).half())
            caps.append(c.caption)
            seeds.append(seed + i)
            if keep_events:
                evs.append([[e.time, e.obj, e.colour, e.kind] for e in c.events])
            if (i + 1) % 200 == 0:
                log(f"dataset {i + 1}/{n}")
    save_file({"video": torch.cat(vids).contiguous(), "audio": torch.cat(auds).contiguous()}, str(out / "latents.safetensors"))
    (out / "latents.json").write_text(json.dumps({"captions": caps, "events": evs, "seeds": seeds}))
    return out


# -- model helpers ------------------------------------------------------------------------------------

def new_model(cfg: StageConfig, seed: int) -> OmniForcingTransformer:
    torch.manual_seed(seed)
    m = OmniForcingTransformer(cfg.model_config())
    return m.train()


def load_into(model: torch.nn.Module, state: dict, allow_missing=("audio_sink_tokens",)) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k not in allow_missing]
    if bad or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {bad[:5]}, unexpected {unexpected[:5]}")


def text_features(textenc: TextEncoder, captions: list[str]) -> torch.Tensor:
    return textenc(captions)


def sample_sigmas(b: int, g: torch.Generator, shift: float) -> torch.Tensor:
    """Logit-normal sigmas, log-shifted towards high noise (LTX-2's training distribution, toy shift)."""
    u = torch.sigmoid(torch.randn(b, generator=g))
    e = math.exp(shift)
    return (e * u / (1 + (e - 1) * u)).clamp(1e-3, 1.0)


def modality_sigmas(s: torch.Tensor, g: torch.Generator, cfg: StageConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-modality sigmas for the teacher: shared `s` by default; for a `cfg.independent_sigmas` share
    of the batch one modality's sigma (either) is an independent uniform draw; for a `cfg.given_share` share one modality
    (either, at random) is clean (sigma 0: given, as in A->V / V->A)."""
    b = s.shape[0]
    other = torch.rand(b, generator=g).clamp(1e-3, 1.0)  # uniform: sigma near 1 (no information) is common
    u, which = torch.rand(b, generator=g), torch.rand(b, generator=g) < 0.5
    given = u < cfg.given_share
    indep = (u >= cfg.given_share) & (u < cfg.given_share + cfg.independent_sigmas)
    sv, sa = torch.where(indep & which, other, s), torch.where(indep & ~which, other, s)
    sv = torch.where(given & which, torch.zeros_like(sv), sv)
    sa = torch.where(given & ~which, torch.zeros_like(sa), sa)
    return sv, sa


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """MSE over the samples in `keep` (a clean, given modality has nothing to predict)."""
    per = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return (per * keep).sum() / keep.sum().clamp(min=1)


def sigma_of_t() -> torch.Tensor:
    """sigma for t = 0..1000 from LTX-2's shifted 1000-step schedule, reversed (DMD noise levels)."""
    grid = ltx2_sigma_grid(1000)
    return torch.tensor(grid[::-1], dtype=torch.float32)


def guided_x0(model, xv, xa, sv, sa, text, uncond, cfg_v: float, cfg_a: float, layout=None, cfg_av: float = 0.0):
    """Teacher x0 with classifier-free guidance (separate video/audio scales), bidirectional by default.

    `cfg_av` > 0 adds modality guidance: each stream's prediction is pushed away from what the model
    predicts when the other stream carries no information (pure noise at sigma 1), i.e. towards what
    the other stream says - the synchrony signal (needs a teacher trained with independent sigmas)."""
    both = text.cat(uncond) if uncond is not None else text

    def velocity(x: AV, s: AV) -> AV:
        return AV(*model(x.video, x.audio, s.video, s.audio, both, layout))
    cfg = AV(cfg_v, cfg_a) if uncond is not None else None
    if not cfg_av:
        return tuple(predict_x0(velocity, AV(xv, xa), AV(sv, sa), cfg))
    # one call: [as given (+ its unconditional half for CFG), video blind (its audio read), audio blind
    # (its video read)], so the conditional prediction serves both guidances
    k, b = (2 if cfg is not None else 1), xv.shape[0]
    g = torch.Generator().manual_seed(0)
    nv, na = torch.randn(xv.shape, generator=g).to(xv), torch.randn(xa.shape, generator=g).to(xa)
    ones = torch.ones_like(sv)
    v, a = model(torch.cat([xv] * k + [nv, xv]), torch.cat([xa] * k + [xa, na]), torch.cat([sv] * k + [ones, sv]),
                 torch.cat([sa] * k + [sa, ones]), both.cat(text).cat(text), layout)
    x0v = x0_from_velocity(torch.cat([xv] * k), v[:k * b], torch.cat([sv] * k))
    x0a = x0_from_velocity(torch.cat([xa] * k), a[:k * b], torch.cat([sa] * k))
    base_v, base_a = (guide(x0v, cfg_v), guide(x0a, cfg_a)) if cfg is not None else (x0v, x0a)
    blind_v = x0_from_velocity(xv, v[(k + 1) * b:], sv)
    blind_a = x0_from_velocity(xa, a[k * b:(k + 1) * b], sa)
    return base_v + cfg_av * (x0v[:b] - blind_v), base_a + cfg_av * (x0a[:b] - blind_a)


def _params_of(opt: torch.optim.Optimizer) -> list:
    """The parameters an optimiser steps: under FSDP the sharded ones, whatever `module.parameters()`
    shows while a root module is unsharded."""
    return [p for gr in opt.param_groups for p in gr["params"]]


@torch.no_grad()
def teacher_sample(model, textenc, captions: list[str], shape_v, shape_a, g: torch.Generator, *, steps: int = 40,
                   cfg_v: float = 3.0, cfg_a: float = 5.0, keep_sigmas=None, cfg_av: float = 0.0,
                   given: Optional[tuple[str, torch.Tensor]] = None):
    """Euler sampling of the bidirectional teacher on LTX-2's shifted grid. Returns (video, audio,
    trajectory) where the trajectory holds the states at the grid points nearest to `keep_sigmas`.
    `given` = ("video" | "audio", latents): that modality is held clean (sigma 0) at every step and
    only the other one is sampled (V->A, A->V)."""
    grid = ltx2_sigma_grid(steps)
    if keep_sigmas is not None:  # make the kept sigmas exact grid points (the student's sigmas)
        grid = sorted(set(grid) | {float(s) for s in keep_sigmas}, reverse=True)
    feats = text_features(textenc, captions)
    text = model.text_kv(feats, feats)
    unc = model.text_kv(*(2 * [text_features(textenc, [""] * len(captions))])) if (cfg_v != 1 or cfg_a != 1) else None
    xv, xa = randn(shape_v, g), randn(shape_a, g)
    keep = {grid.index(float(s)): s for s in keep_sigmas} if keep_sigmas is not None else {}
    traj_v, traj_a = [], []
    b = shape_v[0]
    clean = torch.zeros(b)
    if given is not None:
        xv, xa = (given[1], xa) if given[0] == "video" else (xv, given[1])
    for i in range(len(grid) - 1):
        s, nxt = grid[i], grid[i + 1]
        if i in keep:
            traj_v.append(xv.clone())
            traj_a.append(xa.clone())
        sig = torch.full((b,), s)
        sv = clean if given is not None and given[0] == "video" else sig
        sa = clean if given is not None and given[0] == "audio" else sig
        x0v, x0a = guided_x0(model, xv, xa, sv, sa, text, unc, cfg_v, cfg_a, cfg_av=cfg_av)
        xv = xv if sv is clean else euler_step(xv, x0v, s, nxt)
        xa = xa if sa is clean else euler_step(xa, x0a, s, nxt)
    traj_v.append(xv.clone())
    traj_a.append(xa.clone())
    return xv, xa, (torch.stack(traj_v, 1), torch.stack(traj_a, 1))


def rollout(model, clip, text, exit_step: int, schedule=None, given=None):
    """Self-Forcing's generator rollout: inference exactly (the Sampler's steps, KV cache, clean
    refresh), except that every block exits at `exit_step` - earlier steps without gradient, the
    exit step in the caller's grad mode, the cache refresh without gradient on the detached block
    (history carries no gradient). `given` (a sampling.Given): that modality held clean (A->V, V->A).
    Returns (video, audio, sampler)."""
    sampler = Sampler(model, clip, text, schedule=schedule, given=given)
    if not 0 <= exit_step < sampler.schedule.steps:
        raise ValueError(f"exit_step={exit_step} must lie in 0..{sampler.schedule.steps - 1}")
    grad, out = torch.is_grad_enabled(), []
    for block in clip.blocks():
        _, txt = sampler.prompt_for(block)
        sampler.backend.begin(block)
        x = sampler.noise(block, 0)
        for k, sigma in enumerate(sampler.schedule.sigmas[:exit_step + 1]):
            with torch.set_grad_enabled(grad and k == exit_step):
                x0 = sampler.predict(block, x, sigma, txt)
            if k < exit_step:
                x = sampler.renoise(block, x0, k + 1, sampler.schedule.next_sigma(k))
        with torch.no_grad():
            sampler.commit(block, x0, txt)
        out.append(x0)
    return torch.cat([x.video for x in out], 2), torch.cat([x.audio for x in out], 2), sampler


# -- stages -------------------------------------------------------------------------------------------

class Stage:
    """One trainable stage: modules to save, optimisers, and `step(i)` -> metrics."""

    def __init__(self, cfg: StageConfig, rank: int = 0, world: int = 1, device="cpu"):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, torch.device(device)
        self.layout: BlockLayout = make_layout(cfg.layout, num_sinks=cfg.num_sinks)

    def modules(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        raise NotImplementedError

    def step(self, i: int) -> dict:
        raise NotImplementedError

    def make_optimizers(self) -> None:
        """(Re)create the optimisers over the modules' current parameters: the Runner calls it again
        after FSDP has replaced them with sharded ones."""
        raise NotImplementedError

    def _opt(self, params, lr, betas, wd):
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=wd, foreach=False)

    def _lr(self, opt, i: int, base: float):
        f = min(1.0, (i + 1) / self.cfg.warmup) if self.cfg.warmup else 1.0
        if self.cfg.cooldown:  # weights taken at a constant rate carry its noise: end at a rate of ~0
            f *= min(1.0, max(0.0, (self.cfg.steps - i) / self.cfg.cooldown))
        for gr in opt.param_groups:
            gr["lr"] = base * f

    def _clip(self, params, max_norm: float) -> float:
        return clip_gradients(list(params), max_norm, self.world)


class SupervisedStage(Stage):
    """A stage with one loss, one optimiser over `self.params`, and the {model, text} modules."""

    def modules(self):
        return {"model": self.model, "text": self.textenc}

    def optimizers(self):
        return {"opt": self.opt}

    def step(self, i: int) -> dict:
        loss, out = self._loss(step_generator(self.cfg, i, self.rank))
        self._lr(self.opt, i, self.cfg.lr)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        out["grad_norm"] = self._clip(self.params, self.cfg.grad_clip)
        self.opt.step()
        return out

    @torch.no_grad()
    def eval_loss(self, n: int = 4) -> float:
        """Mean loss over `n` fixed held-out draws (same draws every call): for 'loss goes down' checks."""
        return sum(self._loss(step_generator(self.cfg, 10 ** 9 + k, salt="eval"))[0].item() for k in range(n)) / n


class TeacherStage(SupervisedStage):
    def __init__(self, cfg: StageConfig, rank=0, world=1, device="cpu"):
        super().__init__(cfg, rank, world, device)
        self.data = load_latents(cfg.data)
        self.model = new_model(cfg, cfg.seed)
        torch.manual_seed(cfg.seed + 1)
        self.textenc = TextEncoder(cfg.model_config().caption_channels)
        self.make_optimizers()

    def make_optimizers(self) -> None:
        self.params = list(self.model.parameters()) + list(self.textenc.parameters())
        self.opt = self._opt(self.params, self.cfg.lr, self.cfg.betas, self.cfg.weight_decay)

    def _loss(self, g: torch.Generator):
        cfg = self.cfg
        n = self.data["video"].shape[0]
        idx = torch.randint(n, (cfg.batch,), generator=g)
        x0v, x0a = self.data["video"][idx], self.data["audio"][idx]
        drop = torch.rand(cfg.batch, generator=g) < cfg.caption_dropout
        caps = ["" if d else self.data["captions"][j] for j, d in zip(idx.tolist(), drop.tolist())]
        s = sample_sigmas(cfg.batch, g, cfg.sigma_shift)
        ev, ea = randn(x0v.shape, g), randn(x0a.shape, g)
        sv, sa = modality_sigmas(s, g, cfg) if (cfg.independent_sigmas or cfg.given_share) else (s, s)
        xv, xa = noisy(x0v, ev, sv), noisy(x0a, ea, sa)
        feats = self.textenc(caps)
        text = self.model.text_kv(feats, feats)
        vv, va = self.model(xv, xa, sv, sa, text, None)
        lv, la = _masked_mse(vv, ev - x0v, sv > 0), _masked_mse(va, ea - x0a, sa > 0)
        loss = lv + cfg.audio_loss_weight * la
        return loss, {"loss": loss.item(), "video": lv.item(), "audio": la.item()}


def _load_run_modules(path, names=("model", "text")) -> dict[str, dict]:
    """State dicts by module name from a run dir (its checkpoint) or a checkpoint file."""
    from safetensors.torch import load_file
    p = Path(path)
    f = p / "ckpt.safetensors" if p.is_dir() else p
    t = load_file(str(f))
    out = {}
    for n in names:
        pre = n + "."
        out[n] = {k[len(pre):]: v for k, v in t.items() if k.startswith(pre)}
    return out


def load_teacher(path, device="cpu") -> tuple[OmniForcingTransformer, TextEncoder]:
    p = Path(path)
    cfg = StageConfig.from_dict(json.loads((p / "state.json").read_text())["config"]) if p.is_dir() else None
    mc = cfg.model_config() if cfg else StageConfig("teacher").model_config()
    st = _load_run_modules(p)
    m = OmniForcingTransformer(mc.replace(num_audio_sinks=0, rope=dataclasses.replace(mc.rope, sink_positions="identity")))
    load_into(m, st["model"], allow_missing=())
    te = TextEncoder(mc.caption_channels)
    te.load_state_dict(st["text"])
    return m.to(device).eval().requires_grad_(False), te.to(device).eval().requires_grad_(False)


def make_ode_pairs(cfg: StageConfig, out, log=print) -> Path:
    """Teacher trajectories for Stage II (deterministic for the seed). Prompts from the dataset."""
    from safetensors.torch import save_file
    model, te = load_teacher(cfg.teacher)
    data = load_latents(cfg.data)
    sched = make_schedule(cfg.ode_steps)
    keep = list(sched.sigmas)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = cfg.num_pairs
    vs, as_, caps, givens = [], [], [], []
    shv, sha = data["video"].shape[1:], data["audio"].shape[1:]
    for s in range(0, n, cfg.batch):
        b = min(cfg.batch, n - s)
        g = step_generator(cfg, s)
        idx = torch.randint(len(data["captions"]), (b,), generator=g)
        c = [data["captions"][j] for j in idx.tolist()]
        # a `given_share` of the batches hold one modality (the clip's own latents) clean: conditional
        # trajectories, so the student learns A->V / V->A from what the teacher does with a given stream
        mode = "none"
        if float(torch.rand((), generator=g)) < cfg.given_share:
            mode = "video" if float(torch.rand((), generator=g)) < 0.5 else "audio"
        given = None if mode == "none" else (mode, data[mode][idx].float())
        _, _, (tv, ta) = teacher_sample(model, te, c, (b, *shv), (b, *sha), g, steps=cfg.teacher_steps,
                                        cfg_v=cfg.cfg_video, cfg_a=cfg.cfg_audio, keep_sigmas=keep, cfg_av=cfg.cfg_av,
                                        given=given)
        vs.append(tv.half())
        as_.append(ta.half())
        caps += c
        givens += [mode] * b
        log(f"ode pairs {s + b}/{n} ({mode} given)")
    sig = torch.tensor(keep + [0.0])
    save_file({"video": torch.cat(vs).contiguous(), "audio": torch.cat(as_).contiguous(), "sigmas": sig}, str(out / "pairs.safetensors"))
    (out / "pairs.json").write_text(json.dumps({"captions": caps, "given": givens, "teacher": str(cfg.teacher)}))
    return out


def audio_block_index(layout: BlockLayout, f_v: int, f_a: int, mapping: str) -> torch.Tensor:
    """Block of every audio latent for noise levels: the block table, or the official proportional map."""
    if mapping == "block":
        return torch.tensor([layout.audio_block_of(a) for a in range(f_a)])
    if mapping == "proportional":  # audio frames [round(i Fa/Fv), round((i+1) Fa/Fv)) follow video frame i
        vid = torch.zeros(f_a, dtype=torch.long)
        for i in range(f_v):
            vid[round(i * f_a / f_v):round((i + 1) * f_a / f_v)] = i
        return torch.tensor([layout.video_block_of(int(v)) for v in vid])
    raise ValueError(f"audio_sigma_mapping '{mapping}' unknown; use 'block' or 'proportional'")


class CausalStage(SupervisedStage):
    """Stage II: causal ODE regression under the block-causal masks."""

    def __init__(self, cfg: StageConfig, rank=0, world=1, device="cpu"):
        super().__init__(cfg, rank, world, device)
        from safetensors.torch import load_file
        t = load_file(str(Path(cfg.data) / "pairs.safetensors"))
        self.traj_v, self.traj_a, self.sigmas = t["video"].float(), t["audio"].float(), t["sigmas"].float()
        meta = json.loads((Path(cfg.data) / "pairs.json").read_text())
        self.captions = meta["captions"]
        given = meta.get("given") or ["none"] * len(self.captions)  # which modality each trajectory held clean
        self.given_video = torch.tensor([m == "video" for m in given])
        self.given_audio = torch.tensor([m == "audio" for m in given])
        self.model = new_model(cfg, cfg.seed)
        st = _load_run_modules(cfg.init)
        load_into(self.model, st["model"])  # new sink tokens keep their random init
        self.textenc = TextEncoder(cfg.model_config().caption_channels)
        self.textenc.load_state_dict(st["text"])
        self.textenc.requires_grad_(False).eval()
        self.make_optimizers()
        f_v, f_a = self.traj_v.shape[3], self.traj_a.shape[3]
        self.vblock = torch.tensor([self.layout.video_block_of(f) for f in range(f_v)])
        self.ablock = audio_block_index(self.layout, f_v, f_a, cfg.audio_sigma_mapping)
        self.nblocks = int(self.vblock.max()) + 1

    def make_optimizers(self) -> None:
        self.params = list(self.model.parameters())
        self.opt = self._opt(self.params, self.cfg.lr, self.cfg.betas, self.cfg.weight_decay)

    def _loss(self, g: torch.Generator):
        cfg = self.cfg
        b = cfg.batch
        idx = torch.randint(self.traj_v.shape[0], (b,), generator=g)
        k = torch.randint(self.sigmas.numel(), (b, self.nblocks), generator=g)  # trajectory index per block
        kv, ka = k[:, self.vblock], k[:, self.ablock]  # [B, Fv], [B, Fa]
        last = self.sigmas.numel() - 1  # a conditional trajectory's given modality is clean (sigma 0) throughout
        kv = torch.where(self.given_video[idx][:, None], torch.full_like(kv, last), kv)
        ka = torch.where(self.given_audio[idx][:, None], torch.full_like(ka, last), ka)
        tv, ta = self.traj_v[idx], self.traj_a[idx]  # [B, 5, C, F, ...]
        xv = torch.gather(tv, 1, kv[:, None, None, :, None, None].expand(-1, 1, *tv.shape[2:])).squeeze(1)
        xa = torch.gather(ta, 1, ka[:, None, None, :, None].expand(-1, 1, *ta.shape[2:])).squeeze(1)
        sv, sa = self.sigmas[kv], self.sigmas[ka]
        cv, ca = tv[:, -1], ta[:, -1]
        with torch.no_grad():
            feats = self.textenc([self.captions[j] for j in idx.tolist()])
        text = self.model.text_kv(feats, feats)
        vv, va = self.model(xv, xa, sv, sa, text, self.layout)
        x0v, x0a = x0_from_velocity(xv, vv, sv), x0_from_velocity(xa, va, sa)
        mv, ma = (sv > 1e-6).float(), (sa > 1e-6).float()
        ev = ((x0v - cv) ** 2).mean((1, 3, 4))  # [B, Fv]
        ea = ((x0a - ca) ** 2).mean((1, 3))  # [B, Fa]
        lv = (ev * mv).sum() / mv.sum().clamp(min=1)
        la = (ea * ma).sum() / ma.sum().clamp(min=1)
        loss = lv + cfg.audio_loss_weight * la
        return loss, {"loss": loss.item(), "video": lv.item(), "audio": la.item()}


class DMDStage(Stage):
    """Stage III: joint Self-Forcing DMD with a trainable critic (fake score)."""

    def __init__(self, cfg: StageConfig, rank=0, world=1, device="cpu"):
        super().__init__(cfg, rank, world, device)
        self.teacher, te = load_teacher(cfg.teacher)
        self.textenc = te
        self.critic = copy.deepcopy(self.teacher).train().requires_grad_(True)
        self.model = new_model(cfg, cfg.seed)
        load_into(self.model, _load_run_modules(cfg.init)["model"])
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False) if cfg.ema_decay > 0 else None
        self.make_optimizers()
        self.data = load_latents(cfg.data)
        self.schedule = make_schedule(cfg.ode_steps, context_noise=cfg.context_noise)
        self.sig_t = sigma_of_t()
        self.num_blocks = self.layout.blocks_for_seconds(cfg.seconds)
        with torch.no_grad():
            self.uncond_feats = te([""])

    def _exit_step(self, i: int, grad: bool) -> int:
        """The rollout's exit step: the same on every rank (as the official code broadcasts it), so
        all ranks run the same number of forwards - FSDP's per-forward collectives must match."""
        g = step_generator(self.cfg, i, 0, salt="exit-gen" if grad else "exit-critic")
        return int(torch.randint(self.schedule.steps, (), generator=g))

    def make_optimizers(self) -> None:
        cfg = self.cfg
        self.opt = self._opt(self.model.parameters(), cfg.lr, cfg.betas, cfg.weight_decay)
        self.copt = self._opt(self.critic.parameters(), cfg.critic_lr, cfg.critic_betas, cfg.weight_decay)

    def modules(self):
        m = {"model": self.model, "critic": self.critic, "text": self.textenc}
        if self.ema is not None:
            m["ema"] = self.ema
        return m

    def optimizers(self):
        return {"opt": self.opt, "critic_opt": self.copt}

    def rollout(self, text, g: torch.Generator, i: int, grad: bool, given=None):
        """The generator's rollout with this step's exit step, in `grad` mode at the exit step."""
        exit_step = self._exit_step(i, grad)
        clip = layout_clip(self.layout, self.cfg.size, self.cfg.size, num_blocks=self.num_blocks,
                           seed=_mix(self.cfg.seed, "rollout", i, self.rank) & 0xFFFFFFFF, batch=text.batch)
        with torch.set_grad_enabled(grad):
            v, a, _ = rollout(self.model, clip, text, exit_step, self.schedule, given)
        return v, a, exit_step

    def _given(self, i: int, idx: torch.Tensor):
        """A `given_share` of the steps hold one modality (the clips' own latents) clean in the rollout, the
        teacher and the critic: DMD of A->V / V->A, with loss on the generated modality only."""
        g = step_generator(self.cfg, i, 0, salt="given")  # its own draws: given_share 0 changes nothing else
        if not self.cfg.given_share or float(torch.rand((), generator=g)) >= self.cfg.given_share:
            return None
        mode = "video" if float(torch.rand((), generator=g)) < 0.5 else "audio"
        return Given(mode, self.data[mode][idx].float())

    @staticmethod
    def _hold(given, x, noised, s):
        """(noised video, noised audio), (video sigmas, audio sigmas) with a given modality clean at sigma 0."""
        (xv, xa), (nv, na) = x, noised
        hold_v, hold_a = (given is not None and given.modality == m for m in ("video", "audio"))
        return ((xv if hold_v else nv, xa if hold_a else na),
                (torch.zeros_like(s) if hold_v else s, torch.zeros_like(s) if hold_a else s))

    def _noisy(self, x, g, b):
        t = torch.randint(self.cfg.t_min, self.cfg.t_max + 1, (b,), generator=g)
        s = self.sig_t[t]
        xv, xa = x
        ev, ea = randn(xv.shape, g), randn(xa.shape, g)
        return s, (noisy(xv, ev, s), noisy(xa, ea, s)), (ev, ea)

    def step(self, i: int) -> dict:
        cfg = self.cfg
        g = step_generator(cfg, i, self.rank)
        b = cfg.batch
        idx = torch.randint(len(self.data["captions"]), (b,), generator=g)
        with torch.no_grad():
            feats = self.textenc([self.data["captions"][j] for j in idx.tolist()])
            unc = self.uncond_feats.expand(b, -1, -1)
        text_s = self.model.text_kv(feats, feats)
        out = {}
        given = self._given(i, idx)
        keep_v, keep_a = [float(given is None or given.modality != m) for m in ("video", "audio")]
        if i % cfg.gen_every == 0:  # generator update (the critic runs under no_grad: no toggling of
            # requires_grad, which under FSDP would reach only the parameters registered at that moment)
            xv, xa, e = self.rollout(text_s, g, i, grad=True, given=given)
            s, noised, _ = self._noisy((xv.detach(), xa.detach()), g, b)
            (nv, na), (sv, sa) = self._hold(given, (xv.detach(), xa.detach()), noised, s)
            with torch.no_grad():
                tt = self.teacher.text_kv(feats, feats)
                tu = self.teacher.text_kv(unc, unc)
                rv, ra = guided_x0(self.teacher, nv, na, sv, sa, tt, tu, cfg.cfg_video, cfg.cfg_audio,
                                   cfg_av=cfg.cfg_av)
                ct = self.critic.text_kv(feats, feats)
                fv, fa = guided_x0(self.critic, nv, na, sv, sa, ct, None, 1.0, 1.0)
                gv = torch.nan_to_num((fv - rv) / (xv - rv).abs().mean((1, 2, 3, 4), keepdim=True).add(1e-8))
                ga = torch.nan_to_num((fa - ra) / (xa - ra).abs().mean((1, 2, 3), keepdim=True).add(1e-8))
            lv = 0.5 * F.mse_loss(xv, (xv - gv).detach()) * keep_v
            la = 0.5 * F.mse_loss(xa, (xa - ga).detach()) * keep_a
            loss = lv + cfg.audio_loss_weight * la
            self._lr(self.opt, i, cfg.lr)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            out["gen_grad_norm"] = self._clip(_params_of(self.opt), cfg.grad_clip)
            self.opt.step()
            out.update(dmd=loss.item(), dmd_video=lv.item(), dmd_audio=la.item(), exit=e)
            if self.ema is not None and i >= cfg.ema_start:
                with torch.no_grad():
                    for pe, pm in zip(self.ema.parameters(), _params_of(self.opt)):
                        pe.lerp_(pm, 1 - cfg.ema_decay)
            elif self.ema is not None:
                self.ema.load_state_dict(self.model.state_dict())
        # critic update (every step): flow matching on the generator's samples
        with torch.no_grad():
            xv, xa, _ = self.rollout(text_s, g, i, grad=False, given=given)
        s, noised, (ev, ea) = self._noisy((xv, xa), g, b)
        (nv, na), (sv, sa) = self._hold(given, (xv, xa), noised, s)
        ct = self.critic.text_kv(feats, feats)
        vv, va = self.critic(nv, na, sv, sa, ct, None)
        cl = F.mse_loss(vv, ev - xv) * keep_v + cfg.audio_loss_weight * F.mse_loss(va, ea - xa) * keep_a
        self._lr(self.copt, i, cfg.critic_lr)
        self.copt.zero_grad(set_to_none=True)
        cl.backward()
        out["critic_grad_norm"] = self._clip(_params_of(self.copt), cfg.grad_clip)
        self.copt.step()
        out["critic"] = cl.item()
        out["loss"] = out.get("dmd", float("nan"))
        return out


class BidirectionalDMDStage(DMDStage):
    """Stage I (optional, as in the paper; the released v2 recipe skips it): few-step bidirectional
    DMD. The generator starts from the teacher and denoises the whole clip at once, with no masks,
    on the same few-step schedule; DMD loss, critic and EMA are Stage III's. Its run can initialise
    Stage II (`train --stage causal --init RUN/bidmd`)."""

    def __init__(self, cfg: StageConfig, rank=0, world=1, device="cpu"):
        super().__init__(cfg, rank, world, device)
        self.clip = layout_clip(self.layout, cfg.size, cfg.size, seconds=cfg.seconds)

    def rollout(self, text, g: torch.Generator, i: int, grad: bool, given=None):
        """Whole-clip few-step sampling (x0 prediction, fresh noise between steps); exit step with grad."""
        if given is not None:
            raise ValueError("Stage I (bidirectional DMD) has no given modality: train it with given_share=0")
        sched = self.schedule
        exit_step = self._exit_step(i, grad)
        clip = dataclasses.replace(self.clip, batch=text.batch)
        x = AV(randn(clip.video_shape(), g), randn(clip.audio_shape(), g))

        def velocity(xx: AV, ss: AV) -> AV:
            return AV(*self.model(xx.video, xx.audio, ss.video, ss.audio, text, None))
        for k, sig in enumerate(sched.sigmas[:exit_step + 1]):
            s = AV.both(torch.full((text.batch,), float(sig)))
            with torch.set_grad_enabled(grad and k == exit_step):
                x0 = predict_x0(velocity, x, s)
            if k < exit_step:
                nxt = sched.next_sigma(k)
                x = x0.map(lambda t: noisy(t, randn(t.shape, g), nxt))
        return x0.video, x0.audio, exit_step


STAGES = {"teacher": TeacherStage, "bidmd": BidirectionalDMDStage, "causal": CausalStage, "dmd": DMDStage}

__all__ = ["TeacherStage", "BidirectionalDMDStage", "CausalStage", "DMDStage", "STAGES", "build_dataset", "load_latents", "load_teacher",
           "make_ode_pairs", "teacher_sample", "guided_x0", "rollout", "audio_block_index", "sigma_of_t", "step_generator"]
