"""Measurements of the toy recipe: A/V synchrony, event recall, a fidelity proxy, speed; the sink
ablation; exporting the trained student as the embedded default.

Event detectors (also run on the codec reconstruction of held-out world clips, the reference row):
* sound onsets: decoded log-mel, per colour the band around its pitch, an onset where the band level
  crosses a threshold upwards (100 frames/s, 150 ms refractory);
* visual events: per colour the centroid of pixels near that colour in the decoded frames (24 fps);
  a floor bounce is a local maximum of y, a wall hit a sign flip of the x velocity; time refined by
  a parabola through the three frames around the extremum.
A visual event is matched to the nearest onset of the same colour within +-200 ms; offset =
onset - visual event. Recall = matched visual events / visual events.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from .world import COLOURS, FPS, SHAPES, make_clip

MATCH_S = 0.2


# -- detectors -----------------------------------------------------------------------------------------

# A centred 64 ms STFT window (n_fft 1024 at 16 kHz) sees a tone's attack about half a window early:
# the steepest rise of a band's log level comes 28.9 ms before the true onset on exact world clips
# (sd 5.3 ms over 166 tones; within 1 ms of that from 0.3x to 2x gain, since a log-level slope does
# not depend on the level). The detector adds it back.
ONSET_LAG_S = 0.029


def sound_onsets(log_mel: torch.Tensor, colours=None, thr: float = -5.0, refractory: int = 15) -> dict:
    """log_mel [64, M] -> {colour: [onset seconds]}: per colour, where the band around its pitch crosses
    `thr` upwards (150 ms refractory), timed at the steepest rise of the band's log level within 30 ms
    of the crossing (parabola-refined between frames), plus the analysis window's lag."""
    from .codecs import mel_bin_of
    out = {}
    for c in colours or COLOURS:
        k = mel_bin_of(COLOURS[c][1])
        band = log_mel[max(0, k - 1):k + 2].max(0).values
        rise = (band[1:] - band[:-1]).tolist()  # rise[j - 1]: from frame j - 1 to frame j
        n = band.shape[0]
        on, last = [], -10 ** 9
        for m in range(1, n):
            if band[m] >= thr > band[m - 1] and m - last >= refractory:
                j = max(range(max(1, m - 3), min(n - 1, m + 3) + 1), key=lambda q: rise[q - 1])
                a, b = rise[max(j - 2, 0)], rise[j - 1]
                c2 = rise[j] if j < n - 1 else b
                on.append((j - 0.5 + _parabola_peak(a, b, c2)) / 100.0 + ONSET_LAG_S)
                last = m
        out[c] = on
    return out


def colour_mask(frames: torch.Tensor, colour: str, tol: float = 0.3) -> torch.Tensor:
    """frames [3, F, H, W] -> [F, H, W] bool: pixels within `tol` of the colour in every channel."""
    return (frames - torch.tensor(COLOURS[colour][0]).view(3, 1, 1, 1)).abs().amax(0) < tol


def tracks(frames: torch.Tensor, colours=None, tol: float = 0.3):
    """frames [3, F, H, W] -> {colour: (x [F], y [F], area [F])} centroids (NaN when absent)."""
    out = {}
    f, h, w = frames.shape[1:]
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    for c in colours or COLOURS:
        m = colour_mask(frames, c, tol).float()
        area = m.sum((1, 2))
        cx = (m * xs).sum((1, 2)) / area.clamp(min=1)
        cy = (m * ys[:, None]).sum((1, 2)) / area.clamp(min=1)
        absent = area < 2
        cx[absent], cy[absent] = float("nan"), float("nan")
        out[c] = (cx, cy, area / (h * w))
    return out


def _parabola_peak(a, b, c) -> float:
    den = a - 2 * b + c
    return 0.0 if abs(den) < 1e-12 else float(max(-0.5, min(0.5, 0.5 * (a - c) / den)))


def visual_events(trk: dict, min_v: float = 0.008, edge: float = 0.3) -> dict:
    """{colour: [event seconds]} from centroid tracks: floor bounces (y maxima) and wall hits (x flips)."""
    out = {}
    for c, (x, y, _) in trk.items():
        ev = []
        n = x.shape[0]
        for i in range(1, n - 1):
            if any(math.isnan(float(t)) for t in (x[i - 1], x[i], x[i + 1], y[i - 1], y[i], y[i + 1])):
                continue
            dy0, dy1 = float(y[i] - y[i - 1]), float(y[i + 1] - y[i])
            dx0, dx1 = float(x[i] - x[i - 1]), float(x[i + 1] - x[i])
            if dy0 > min_v and dy1 < -min_v and float(y[i]) > 1 - edge:  # near the floor
                ev.append((i + _parabola_peak(float(y[i - 1]), float(y[i]), float(y[i + 1]))) / FPS)
            elif ((dx0 > min_v and dx1 < -min_v and float(x[i]) > 1 - edge)
                  or (dx0 < -min_v and dx1 > min_v and float(x[i]) < edge)):  # near a wall
                ev.append((i + _parabola_peak(float(x[i - 1]), float(x[i]), float(x[i + 1]))) / FPS)
        out[c] = ev
    return out


def match(vis: dict, aud: dict, window: float = MATCH_S):
    offsets, n_vis, n_match = [], 0, 0
    for c, ts in vis.items():
        for t in ts:
            n_vis += 1
            cand = [a - t for a in aud.get(c, []) if abs(a - t) <= window]
            if cand:
                n_match += 1
                offsets.append(min(cand, key=abs))
    return offsets, n_vis, n_match


def caption_colours(caption: str) -> list[str]:
    return [c for c in COLOURS if c in caption.split()]


def presence(trk: dict, colours: list[str]) -> float:
    """Fraction of frames where exactly the captioned colours are visible with a plausible area."""
    f = next(iter(trk.values()))[2].shape[0]
    ok = torch.ones(f, dtype=torch.bool)
    for c, (_, _, area) in trk.items():
        if c in colours:
            ok &= (area > 0.004) & (area < 0.12)
        else:
            ok &= area < 0.002
    return float(ok.float().mean())


def caption_shapes(caption: str) -> dict:
    """{colour: shape} as the caption says ("a red ball bounces twice, a blue square slides")."""
    w = caption.replace(",", " ").split()
    return {c: w[i + 1] for i, c in enumerate(w[:-1]) if c in COLOURS and w[i + 1] in SHAPES}


# A disc fills pi/4 of its bounding box, a square all of it. Held-out world clips at the codecs' working
# size (64 px): balls 0.71-0.83, squares 0.96-1.0 (5th-95th percentile; 610 and 364 object frames).
SQUARE_FILL = 0.89


def shape_score(frames: torch.Tensor, shapes: dict, tol: float = 0.3) -> tuple[int, int]:
    """(frames where a captioned object shows the captioned shape, frames where it shows at all): the
    share of its mask in its bounding box, square above `SQUARE_FILL`, ball below."""
    ok = n = 0
    for c, shape in shapes.items():
        m = colour_mask(frames, c, tol)
        for f in range(m.shape[0]):
            area = int(m[f].sum())
            if area < 6:
                continue
            ys, xs = torch.nonzero(m[f], as_tuple=True)
            box = int((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
            n += 1
            ok += (area / box > SQUARE_FILL) == (shape == "square")
    return ok, n


def analyse(frames: torch.Tensor, log_mel: torch.Tensor, caption: str) -> dict:
    cols = caption_colours(caption)
    trk = tracks(frames, list(COLOURS))
    vis = visual_events({c: trk[c] for c in cols})
    aud = sound_onsets(log_mel, cols)
    offs, nv, nm = match(vis, aud)
    shape_ok, shape_n = shape_score(frames, caption_shapes(caption))
    return {"offsets": offs, "n_visual": nv, "n_matched": nm, "presence": presence(trk, cols),
            "n_onsets": sum(len(v) for v in aud.values()), "shape_ok": shape_ok, "shape_n": shape_n}


# -- generation paths ------------------------------------------------------------------------------------

def _decode(codecs, v, a):
    frames = codecs.video.decode(v, full_res=False)[0]
    mel = codecs.audio.decode_mel(a)[0]
    return frames, mel


def gen_teacher(teacher, te, caption, shape_v, shape_a, seed, steps, cfg_v=3.0, cfg_a=5.0, cfg_av=0.0, given=None):
    from .stages import teacher_sample
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    v, a, _ = teacher_sample(teacher, te, [caption], shape_v, shape_a, g, steps=steps, cfg_v=cfg_v, cfg_a=cfg_a,
                             cfg_av=cfg_av, given=given)
    dt = time.perf_counter() - t0
    return v, a, dt, dt  # bidirectional: the first chunk is the whole clip


@torch.no_grad()
def gen_causal(model, te, caption, layout, size, seconds, seed, given=None, policy=None):
    from ..cache import CachePolicy
    from ..sampling import stream
    from ..layout import make_clip as make_layout_clip
    feats = te([caption])
    text = model.text_kv(feats, feats)
    clip = make_layout_clip(layout, size, size, seconds=seconds, seed=seed)
    t0 = time.perf_counter()
    ttfc, vs, as_ = None, [], []
    for r in stream(model, clip, text, given=given, policy=policy or CachePolicy()):
        if ttfc is None:
            ttfc = time.perf_counter() - t0
        vs.append(r.video)
        as_.append(r.audio)
    return torch.cat(vs, 2), torch.cat(as_, 2), time.perf_counter() - t0, ttfc


def _row(name, results, times, ttfcs):
    offs = [o for r in results for o in r["offsets"]]
    nv = sum(r["n_visual"] for r in results)
    nm = sum(r["n_matched"] for r in results)
    absd = sorted(abs(o) * 1000 for o in offs)
    p90 = absd[min(len(absd) - 1, int(math.ceil(0.9 * len(absd))) - 1)] if absd else float("nan")
    return {"model": name, "mean_abs_offset_ms": sum(absd) / len(absd) if absd else float("nan"),
            "mean_signed_offset_ms": 1000 * sum(offs) / len(offs) if offs else float("nan"),
            "p90_abs_offset_ms": p90, "event_recall": nm / nv if nv else float("nan"), "visual_events": nv,
            "presence": sum(r["presence"] for r in results) / len(results),
            "shape": (sum(r.get("shape_ok", 0) for r in results) / max(1, sum(r.get("shape_n", 0) for r in results))
                      if any(r.get("shape_n") for r in results) else float("nan")),
            "s_per_clip": sum(times) / len(times) if times else float("nan"),
            "ttfc_s": sum(ttfcs) / len(ttfcs) if ttfcs else float("nan")}


def format_table(rows: list[dict]) -> str:
    head = ("| model | A/V offset mean abs (ms) | p90 abs (ms) | mean signed (ms) | event recall | visual events "
            "| object presence | shape correct | s / clip | time to first chunk (s) |")
    lines = [head, "|" + "---|" * 10]
    f = lambda x, d=1: "n/a" if x != x else f"{x:.{d}f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['model']} | {f(r['mean_abs_offset_ms'])} | {f(r['p90_abs_offset_ms'])} | "
                     f"{f(r['mean_signed_offset_ms'])} | {f(r['event_recall'], 2)} | {r['visual_events']} | "
                     f"{f(r['presence'], 2)} | {f(r.get('shape', float('nan')), 2)} | {f(r['s_per_clip'], 2)} | "
                     f"{f(r['ttfc_s'], 2)} |")
    return "\n".join(lines)


GROUND_TRUTH, CHANCE = "ground-truth clip (detector check)", "chance level (ground truth, audio shifted 0.7 s)"


def measure(generate, truth_of: dict, codecs, n: int, seed: int, seconds: int, size: int, log=print,
            analyse_fn=None) -> dict:
    """Run `generate(caption, seed, true_video_latents, true_audio_latents)` -> {row: (video, audio, s, ttfc)}
    on `n` held-out world clips and analyse what it made: row -> (results, seconds per clip, ttfcs).

    `truth_of[row]` names the modality that row measures as it truly is ("audio": A->V and its
    control, whose generated video is matched against the clip's true audio; "video": V->A), or None.
    The first two rows are the detectors on the exact clip (ground truth) and with its audio shifted
    0.7 s (chance: right sounds, wrong times)."""
    from .encode import encode_audio, encode_video
    analyse_fn = analyse_fn or analyse
    acc = {k: ([], [], []) for k in (GROUND_TRUTH, CHANCE, *truth_of)}
    for i in range(n):
        clip = make_clip(seed + i, seconds, size)
        cap = clip.caption
        gt_frames = torch.nn.functional.avg_pool3d(clip.video, (1, codecs.video.pool, codecs.video.pool))
        gt_mel = codecs.audio.front(clip.audio[None])[0]
        with torch.no_grad():
            zv, za = encode_video(codecs, clip.video[None]), encode_audio(codecs, clip.audio[None])
        made = {GROUND_TRUTH: (gt_frames, gt_mel, None), CHANCE: (gt_frames, torch.roll(gt_mel, 70, dims=1), None)}
        for k, (v, a, dt, tt) in generate(cap, seed + i, zv, za).items():
            fr, mel = _decode(codecs, v, a)
            made[k] = (gt_frames if truth_of[k] == "video" else fr, gt_mel if truth_of[k] == "audio" else mel,
                       (dt, tt) if dt == dt else None)
        for k, (fr, mel, tm) in made.items():
            acc[k][0].append(analyse_fn(fr, mel, cap))
            if tm is not None:
                acc[k][1].append(tm[0])
                acc[k][2].append(tm[1])
        log(f"clip {i + 1}/{n}: {cap}")
    return acc


def run_report(teacher_dir, student_dir, codecs_dir, n: int = 12, seed: int = 7_000_000, teacher_steps: int = 20,
               seconds: int = 2, size: int = 128, log=print, use_ema: bool = True, stage2_dir=None,
               cfg_av: float = 0.0) -> list[dict]:
    """The ladder on `n` held-out world clips, A->V and V->A included (the true audio / video given).
    `student_dir` None: the reference and teacher rows only (a check while the teacher trains)."""
    from ..layout import make_layout
    from ..sampling import Given
    from .codecs import load_codecs
    from .stages import load_teacher
    codecs = load_codecs(codecs_dir)
    teacher, te = load_teacher(teacher_dir)
    tname = f"teacher (bidirectional, {teacher_steps} Euler steps, CFG{f', modality guidance {cfg_av:g}' if cfg_av else ''})"
    causal = {"student (causal, 4 steps, KV cache)": load_student(student_dir, use_ema) if student_dir else None,
              "undistilled causal (teacher weights, causal, 4 steps, KV cache)":
                  (teacher, make_layout("v2")) if student_dir else None,
              "student after Stage II only (causal, 4 steps, KV cache)":
                  load_student(stage2_dir, use_ema) if stage2_dir else None}
    causal = {k: v for k, v in causal.items() if v is not None}
    student = causal.get("student (causal, 4 steps, KV cache)")
    a2v, v2a = "A->V: {}, true audio given, its video vs that audio", "V->A: {}, true video given, its audio vs that video"
    truth_of = {"codec reconstruction (reference)": None, tname: None, a2v.format("teacher"): "audio",
                v2a.format("teacher"): "video", **{k: None for k in causal}}
    if student:
        truth_of.update({a2v.format("student"): "audio", v2a.format("student"): "video"})

    def generate(cap, s, zv, za):
        teach = lambda given=None: gen_teacher(teacher, te, cap, zv.shape, za.shape, s, teacher_steps,  # noqa: E731
                                               cfg_av=cfg_av, given=given)
        out = {"codec reconstruction (reference)": (zv, za, float("nan"), float("nan")), tname: teach(),
               a2v.format("teacher"): teach(("audio", za)), v2a.format("teacher"): teach(("video", zv))}
        out.update({k: gen_causal(m, te, cap, lay, size, seconds, s) for k, (m, lay) in causal.items()})
        if student:
            model, layout = student
            out[a2v.format("student")] = gen_causal(model, te, cap, layout, size, seconds, s, Given("audio", za))
            out[v2a.format("student")] = gen_causal(model, te, cap, layout, size, seconds, s, Given("video", zv))
        return out
    acc = measure(generate, truth_of, codecs, n, seed, seconds, size, log)
    return [_row(k, *v) for k, v in acc.items()]


def run_long_report(student_dir, codecs_dir, seconds: int = 60, segment: int = 10, n: int = 6,
                    seed: int = 7_100_000, window: int = 1, size: int = 128, log=print) -> list[dict]:
    """Drift over a long stream: the student streams `seconds` with a rolling window of `window` history
    blocks (+ the sink block) on held-out captions; one row per `segment` seconds."""
    from ..cache import CachePolicy
    from .codecs import load_codecs
    from .stages import _load_run_modules
    from .textenc import TextEncoder
    codecs = load_codecs(codecs_dir)
    student, layout = load_student(student_dir)
    te = TextEncoder(student.config.caption_channels)
    te.load_state_dict(_load_run_modules(student_dir, ("text",))["text"])
    te.eval().requires_grad_(False)
    segs = [([], [], []) for _ in range(seconds // segment)]
    for i in range(n):
        cap = make_clip(seed + i, 2, size).caption
        v, a, dt, tt = gen_causal(student, te, cap, layout, size, seconds, seed + i, policy=CachePolicy(window=window))
        frames, mel = _decode(codecs, v, a)
        for j, acc in enumerate(segs):
            f0, m0 = j * segment * FPS, j * segment * 100
            acc[0].append(analyse(frames[:, f0:f0 + segment * FPS + 1], mel[:, m0:m0 + segment * 100 + 1], cap))
        segs[0][1].append(dt / (seconds / 2))  # per 2 s, comparable with the clip rows
        segs[0][2].append(tt)
        log(f"long stream {i + 1}/{n}: {cap} ({dt:.1f} s)")
    return [_row(f"student, {seconds} s stream, rolling window {window}: {j * segment}-{(j + 1) * segment} s", *acc)
            for j, acc in enumerate(segs)]


# -- student export / loading -----------------------------------------------------------------------------

def load_student(path, use_ema: bool = True):
    """A trained causal student from a run dir (EMA weights when present) -> (model, layout)."""
    from ..layout import make_layout
    from ..model import OmniForcingTransformer
    from .configs import StageConfig
    from .stages import _load_run_modules, load_into
    p = Path(path)
    cfg = StageConfig.from_dict(json.loads((p / "state.json").read_text())["config"])
    st = _load_run_modules(p, ("model", "ema"))
    w = st["ema"] if use_ema and st["ema"] else st["model"]
    m = OmniForcingTransformer(cfg.model_config())
    load_into(m, w, allow_missing=())
    return m.eval().requires_grad_(False), make_layout(cfg.layout, num_sinks=cfg.num_sinks)


def export_assets(student_dir, codecs_dir, out, use_ema: bool = True) -> dict:
    """Write the embedded default: student transformer (LTX-2 key names + header), caption encoder,
    codec encoders and decoders (+ latent statistics). Small fp32 safetensors."""
    from safetensors.torch import save_file
    from ..loader import header_for
    from .codecs import load_codecs
    from .stages import _load_run_modules
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model, layout = load_student(student_dir, use_ema)
    te = _load_run_modules(student_dir, ("text",))["text"]
    meta = {"config": json.dumps({"transformer": header_for(model.config)}),
            "omniforcing_toy": json.dumps({"model_config": json.loads(model.config.to_json()), "layout": layout.kind,
                                           "num_sinks": layout.num_sinks, "size": 128, "seconds": 2})}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "toy_student.safetensors"),
              metadata=meta)
    save_file({k: v.contiguous() for k, v in te.items()}, str(out / "toy_text.safetensors"))
    c = load_codecs(codecs_dir)
    keep = {k: v.contiguous() for k, v in c.state_dict().items()
            if ".dec." in f".{k}" or ".enc." in f".{k}" or "latent_" in k}  # encoders too: A->V, V->A
    save_file(keep, str(out / "toy_codecs.safetensors"))
    sizes = {f.name: f.stat().st_size for f in out.glob("toy_*.safetensors")}
    print(json.dumps(sizes))
    return sizes


# -- sink ablation ------------------------------------------------------------------------------------------

def ablation_main(a) -> int:
    from .configs import toy_config
    from .train import Runner, summarize
    rows = []
    variants = []  # tokens: "v2" (4-3-3-3-3, no sinks), "N" (prefix, N sinks, identity RoPE), "Ni" (incremental)
    for tok in a.sinks.split(","):
        if tok == "v2":
            variants.append(("v2", 0, "identity"))
        else:
            variants.append(("prefix", int(tok.rstrip("i")), "incremental" if tok.endswith("i") else "identity"))
    for layout, s, pos in variants:
        name = "v2 4-3-3-3-3 (no sinks)" if layout == "v2" else \
            f"prefix S={s}" + (" incremental RoPE" if pos == "incremental" else (" identity RoPE" if s else ""))
        cfg = toy_config("causal", data=a.data, init=a.teacher, steps=a.steps, layout=layout, num_sinks=s,
                         sink_positions=pos, lr=a.lr, log_every=max(1, a.steps // 3), save_every=10 ** 9)
        t0 = time.perf_counter()
        sub = f"{layout}_S{s}_{pos}"
        Runner(cfg, Path(a.out) / sub, resume=False).run()
        wall = time.perf_counter() - t0
        st = json.loads((Path(a.out) / sub / "state.json").read_text())
        sm = summarize(st["metrics"], window=max(5, a.steps // 10))
        sa = summarize(st["metrics"], key="audio", window=max(5, a.steps // 10))
        rows.append({"variant": name, "loss_first": sm["first"], "loss_last": sm["last"],
                     "audio_loss_last": sa["last"], "max_grad_norm": sm["max_grad_norm"], "finite": sm["finite"],
                     "wall_s": wall})
        print(json.dumps(rows[-1]))
    lines = ["| variant | loss (first 10%) | loss (last 10%) | audio loss (last 10%) | max grad norm | converged |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        conv = "yes" if r["finite"] and r["loss_last"] < 0.7 * r["loss_first"] else "no"
        lines.append(f"| {r['variant']} | {r['loss_first']:.4f} | {r['loss_last']:.4f} | {r['audio_loss_last']:.4f} "
                     f"| {r['max_grad_norm']:.3f} | {conv} |")
    table = "\n".join(lines)
    print(table)
    (Path(a.out) / "ablation.json").write_text(json.dumps(rows, indent=1))
    (Path(a.out) / "ablation.md").write_text(table + "\n")
    return 0


def _publish(rows, table: str, json_path) -> int:
    """Print a report's table; with --json also write the rows (JSON) and the table (.md beside it)."""
    print(table)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))
        Path(json_path).with_suffix(".md").write_text(table + "\n")
    return 0


def main(a) -> int:
    rows = run_report(a.teacher, a.student, a.codecs, n=a.n, seed=a.seed, teacher_steps=a.teacher_steps,
                      stage2_dir=a.stage2, cfg_av=a.cfg_av)
    if a.student and a.long_seconds:
        rows += run_long_report(a.student, a.codecs, seconds=a.long_seconds, n=a.long_n, window=a.window)
    return _publish(rows, format_table(rows), a.json)


__all__ = ["sound_onsets", "tracks", "visual_events", "match", "analyse", "run_report", "format_table",
           "load_student", "export_assets", "ablation_main"]


# -- the README demo ------------------------------------------------------------------------------------------

def measure_default(prompt: str = "a red ball bounces twice, a blue square slides", seconds: int = 3,
                    seeds=(0, 1, 2, 3), assets=None) -> dict:
    """Stream the embedded default on the demo prompt and measure the A/V offset of what it made."""
    from .default import load_default
    from ..layout import make_clip as layout_clip
    from ..sampling import stream
    d = load_default(assets)
    if not d.trained:
        raise RuntimeError("no trained assets: load_default() is the random fallback; run `export` first")
    results, times, ttfcs = [], [], []
    for seed in seeds:
        clip = layout_clip(d.layout, d.size, d.size, seconds=seconds, seed=seed)
        t0 = time.perf_counter()
        vs, as_, ttfc = [], [], None
        with torch.no_grad():
            for r in stream(d.model, clip, d.text(prompt)):
                ttfc = ttfc if ttfc is not None else time.perf_counter() - t0
                vs.append(r.video)
                as_.append(r.audio)
        times.append(time.perf_counter() - t0)
        ttfcs.append(ttfc)
        v, a = torch.cat(vs, 2), torch.cat(as_, 2)
        frames = d.codecs.video.decode(v, full_res=False)[0]
        mel = d.codecs.audio.decode_mel(a)[0]
        results.append(analyse(frames, mel, prompt))
    row = _row(f"demo: '{prompt}', {seconds} s, seeds {list(seeds)}", results, times, ttfcs)
    return row


def demo_main(a) -> int:
    row = measure_default(a.prompt, a.seconds, tuple(range(a.seeds)))
    print(format_table([row]))
    print(json.dumps(row))
    return 0


# -- conditioned streams (A->V, V->A) -----------------------------------------------------------------------

def _given_stream(d, caption: str, seconds: int, seed: int, given=None):
    """The embedded student streamed on `caption` (optionally with a `Given` modality) -> latents, seconds."""
    from ..layout import make_clip as layout_clip
    from ..sampling import stream
    clip = layout_clip(d.layout, d.size, d.size, seconds=seconds, seed=seed)
    t0 = time.perf_counter()
    ttfc, vs, as_ = None, [], []
    with torch.no_grad():
        for r in stream(d.model, clip, d.text(caption), given=given):
            ttfc = ttfc if ttfc is not None else time.perf_counter() - t0
            vs.append(r.video)
            as_.append(r.audio)
    return torch.cat(vs, 2), torch.cat(as_, 2), time.perf_counter() - t0, ttfc


def onset_recall(results: list[dict]) -> float:
    """Sound onsets that have a visual event of their colour within the match window / onsets."""
    n = sum(r["n_onsets"] for r in results)
    return sum(r["n_onsets_matched"] for r in results) / n if n else float("nan")


def _analyse_both_ways(frames, log_mel, caption) -> dict:
    """`analyse` plus the reverse recall (each onset looked up among the visual events)."""
    res = analyse(frames, log_mel, caption)
    cols = caption_colours(caption)
    vis = visual_events({c: v for c, v in tracks(frames, cols).items()})
    aud = sound_onsets(log_mel, cols)
    _, _, res["n_onsets_matched"] = match(aud, vis)
    res["n_onsets"] = sum(len(v) for v in aud.values())
    return res


def run_conditioned_report(n: int = 48, seed: int = 7_000_000, seconds: int = 2, assets=None, log=print) -> list[dict]:
    """A->V and V->A on held-out world clips with the embedded student (`sampling.Given`).

    A->V: the clip's true audio is encoded and given; the generated video's visual events are matched
    to the true audio's onsets. V->A: the true video is given; the generated audio's onsets are matched
    to the true video's visual events. The unconditioned rows generate both modalities on the same
    caption and seed and match the generated modality against the same true media: what the caption
    alone buys (chance for timing). The encoder row decodes the given latents themselves."""
    from .default import load_default
    from ..sampling import Given
    d = load_default(assets)
    if not d.trained:
        raise RuntimeError("no trained assets: load_default() is the random fallback; run `export` first")
    enc, a2v, a2v0, v2a, v2a0 = ("given latents decoded (the encoder check)",
                                 "A->V: student, true audio given, generated video",
                                 "A->V control: unconditioned student video vs the true audio",
                                 "V->A: student, true video given, generated audio",
                                 "V->A control: unconditioned student audio vs the true video")

    def generate(cap, s, zv, za):
        joint = _given_stream(d, cap, seconds, s)
        return {enc: (zv, za, float("nan"), float("nan")), a2v: _given_stream(d, cap, seconds, s, Given("audio", za)),
                a2v0: joint, v2a: _given_stream(d, cap, seconds, s, Given("video", zv)), v2a0: joint}
    acc = measure(generate, {enc: None, a2v: "audio", a2v0: "audio", v2a: "video", v2a0: "video"}, d.codecs, n, seed,
                  seconds, d.size, log, analyse_fn=_analyse_both_ways)
    rows = []
    for k, (res, times, ttfcs) in acc.items():
        row = _row(k, res, times, ttfcs)
        row["onset_recall"] = onset_recall(res)
        row["onsets"] = sum(r["n_onsets"] for r in res)
        rows.append(row)
    return rows


def format_conditioned_table(rows: list[dict]) -> str:
    """`format_table` plus the reverse recall: the share of sound onsets with a visual event of their
    colour within +-200 ms (what A->V must raise: every sound seen)."""
    lines = format_table(rows).splitlines()
    lines[0] += " onset recall | onsets |"
    lines[1] += "---|---|"
    for j, r in enumerate(rows):
        x = r["onset_recall"]
        lines[2 + j] += f" {'n/a' if x != x else f'{x:.2f}'} | {r['onsets']} |"
    return "\n".join(lines)


def conditioned_main(a) -> int:
    rows = run_conditioned_report(a.n, a.seed, a.seconds, a.assets)
    return _publish(rows, format_conditioned_table(rows), a.json)
