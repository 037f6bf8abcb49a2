"""python -m omniforcing_core.toy {codecs,data,train,report,ablation,export} ...

The whole toy recipe, in order:
  codecs  -> train the tiny video/audio autoencoders on world clips
  data    -> render + encode a latent dataset (train and held-out)
  train --stage teacher -> bidirectional flow-matching teacher (+ caption encoder)
  train --stage bidmd   -> (optional) Stage I bidirectional few-step DMD; may initialise Stage II
  train --stage ode     -> teacher ODE trajectories (Stage II data)
  train --stage causal  -> Stage II causal ODE regression
  train --stage dmd     -> Stage III Self-Forcing DMD with a critic
  report  -> synchrony / fidelity / speed table; ablation -> sink table; export -> shipped assets
Under torchrun the `train` command runs distributed (see train.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _kv(items):
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def cmd_codecs(a) -> int:
    import torch
    from .codecs import Codecs, train_codecs
    from .world import make_clip
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    c = Codecs()
    clips = [make_clip(a.seed * 100003 + 5_000_000 + i, a.seconds, a.size) for i in range(a.clips)]
    r = train_codecs(c, clips, steps=a.steps, seed=a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in c.state_dict().items()}, str(out / "codecs.safetensors"))
    r["wall_s"] = time.perf_counter() - t0
    (out / "codecs.json").write_text(json.dumps(r, indent=1))
    print(json.dumps(r))
    return 0


def cmd_data(a) -> int:
    from .codecs import load_codecs
    from .stages import build_dataset
    t0 = time.perf_counter()
    build_dataset(a.out, load_codecs(a.codecs), a.n, a.seed, a.seconds, a.size)
    print(f"dataset {a.out}: {a.n} clips in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_train(a) -> int:
    from .configs import StageConfig, load_named, toy_config
    if a.config:
        cfg = StageConfig.load(a.config) if Path(a.config).exists() else load_named(a.config)
    else:
        cfg = toy_config(a.stage)
    over = _kv(a.set)
    for k in ("data", "init", "teacher", "steps", "seed", "batch", "layout", "num_sinks", "sink_positions"):
        v = getattr(a, k, None)
        if v is not None:
            over[k] = v
    cfg = StageConfig.from_dict({**cfg.to_dict(), **over, "stage": a.stage})
    t0 = time.perf_counter()
    if a.stage == "ode":
        from .stages import make_ode_pairs
        make_ode_pairs(cfg, a.run)
    else:
        from .distributed import shutdown
        from .train import Runner
        Runner(cfg, a.run, resume=not a.fresh).run(a.max_steps)
        shutdown()
    print(f"[{a.stage}] wall {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_report(a) -> int:
    from .report import main as report_main
    return report_main(a)


def cmd_ablation(a) -> int:
    from .report import ablation_main
    return ablation_main(a)


def cmd_export(a) -> int:
    from .report import export_assets
    export_assets(a.student, a.codecs, a.out, use_ema=not a.no_ema)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m omniforcing_core.toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("codecs")
    c.add_argument("--out", required=True)
    c.add_argument("--clips", type=int, default=256)
    c.add_argument("--steps", type=int, default=1500)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--seconds", type=int, default=2)
    c.add_argument("--size", type=int, default=128)
    c.set_defaults(fn=cmd_codecs)
    d = sub.add_parser("data")
    d.add_argument("--codecs", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, default=1500)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--seconds", type=int, default=2)
    d.add_argument("--size", type=int, default=128)
    d.set_defaults(fn=cmd_data)
    t = sub.add_parser("train")
    t.add_argument("--stage", required=True, choices=["teacher", "bidmd", "ode", "causal", "dmd"],
                   help="teacher; bidmd = optional Stage I (bidirectional few-step DMD); ode = Stage II data; "
                        "causal = Stage II; dmd = Stage III")
    t.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="run dir (resumed when it holds a checkpoint); under torchrun spell it --run-dir")
    t.add_argument("--config", help="stage config: a JSON file or a shipped name (toy_teacher, toy_ode, toy_causal, toy_dmd)")
    t.add_argument("--data")
    t.add_argument("--init")
    t.add_argument("--teacher")
    t.add_argument("--steps", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--batch", type=int)
    t.add_argument("--layout", choices=["v2", "prefix"])
    t.add_argument("--num-sinks", dest="num_sinks", type=int)
    t.add_argument("--sink-positions", dest="sink_positions", choices=["identity", "incremental"])
    t.add_argument("--max-steps", type=int, help="stop after this many steps of this invocation")
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--set", nargs="*", help="override config fields: key=json")
    t.set_defaults(fn=cmd_train)
    r = sub.add_parser("report")
    r.add_argument("--teacher", required=True)
    r.add_argument("--student", help="the causal student's run dir (without it: reference and teacher rows only)")
    r.add_argument("--codecs", required=True)
    r.add_argument("--n", type=int, default=12)
    r.add_argument("--teacher-steps", type=int, default=20)
    r.add_argument("--seed", type=int, default=7_000_000)
    r.add_argument("--stage2", help="also measure this Stage II run (before DMD)")
    r.add_argument("--cfg-av", dest="cfg_av", type=float, default=0.0,
                   help="the teacher's modality guidance (what the ODE pairs and DMD used)")
    r.add_argument("--long-seconds", dest="long_seconds", type=int, default=60,
                   help="also stream the student this long with a rolling window, one row per 10 s (0: skip)")
    r.add_argument("--long-n", dest="long_n", type=int, default=6, help="long streams to measure")
    r.add_argument("--window", type=int, default=1, help="history blocks the long streams keep (+ the sink block)")
    r.add_argument("--json")
    r.set_defaults(fn=cmd_report)
    ab = sub.add_parser("ablation")
    ab.add_argument("--teacher", required=True)
    ab.add_argument("--data", required=True)
    ab.add_argument("--out", required=True)
    ab.add_argument("--steps", type=int, default=150)
    ab.add_argument("--sinks", default="v2,0,1,2,4,8,16,16i",
                    help="variants: v2 (4-3-3-3-3), N (prefix, N sinks, identity RoPE), Ni (incremental RoPE)")
    ab.add_argument("--lr", type=float, default=3e-4)
    ab.set_defaults(fn=cmd_ablation)
    dm = sub.add_parser("demo-sync", help="measure the A/V offset of the embedded default on the demo prompt")
    dm.add_argument("--prompt", default="a red ball bounces twice, a blue square slides")
    dm.add_argument("--seconds", type=int, default=3)
    dm.add_argument("--seeds", type=int, default=4)
    dm.set_defaults(fn=lambda a: __import__("omniforcing_core.toy.report", fromlist=["demo_main"]).demo_main(a))
    cd = sub.add_parser("conditioned", help="A->V and V->A with the embedded student on held-out world clips")
    cd.add_argument("--n", type=int, default=48)
    cd.add_argument("--seed", type=int, default=7_000_000)
    cd.add_argument("--seconds", type=int, default=2)
    cd.add_argument("--assets", default=None, help="exported toy assets (default: the shipped ones)")
    cd.add_argument("--json")
    cd.set_defaults(fn=lambda a: __import__("omniforcing_core.toy.report",
                                            fromlist=["conditioned_main"]).conditioned_main(a))
    e = sub.add_parser("export")
    e.add_argument("--student", required=True)
    e.add_argument("--codecs", required=True)
    e.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets"))
    e.add_argument("--no-ema", action="store_true")
    e.set_defaults(fn=cmd_export)
    a = p.parse_args(argv)
    import os
    import torch
    # one thread: on a shared CPU extra threads spin against other processes and run several times slower
    torch.set_num_threads(int(os.environ.get("TOY_THREADS", "1")))
    return a.fn(a)


if __name__ == "__main__":
    sys.exit(main())
