"""Write the reference fixtures that tests/test_reference.py compares against, by running the reference
code itself on small random weights. The reference code is never copied into this repository: give
paths to checkouts of it.

    python tests/reference/make_fixtures.py --omniforcing PATH --comfyui PATH [--ltx2 PATH] [--out DIR]
                                            [--only PART,...]

  --omniforcing  github.com/OmniForcing/OmniForcing (its `ltx-causal` package: LTX-2/packages/ltx-causal/src)
  --comfyui      ComfyUI at 783545f6 (comfy/ldm/lightricks); needs comfy-kitchen, comfy-aimdo, psutil,
                 pyyaml, pillow, scipy, tqdm in this interpreter
  --ltx2         github.com/Lightricks/LTX-2 (its `ltx-core` package: packages/ltx-core/src); optional

Every reference runs in its own subprocess (ltx-causal and ltx-core both ship a package named
`ltx_core`), on CPU with one thread. Weights are random (our `random_model`, q/k-norm weights scaled so
attention is sharp, every value rounded to bfloat16 so it is exact in float32 and float64 alike),
inputs random, outputs whatever the reference returns. Files written (each a few hundred KB at most):

  official_causal.safetensors  weights and inputs of the ltx-causal run below
  official_causal.vml-*.safetensors  ltx-causal CausalLTXModel in float64: per-block velocities of the
                               masked full-sequence path and of the KV-cache path (v2 layout, 3 blocks)
  bidirectional_weights.safetensors  the tiny model with text connectors, shared by the next two
  comfyui.safetensors          ComfyUI LTXAVModel in float32, raw text through its connectors: its default
                               configuration and the LTX-2 header's, scalar and per-token sigmas
  ltx_core.safetensors         ltx-core LTXModel (+ Embeddings1DConnector) in float32, LTX-2 header config
  rope19b_<ref>.vml-*.safetensors  RoPE tables at the real 19B sizes (16 latent frames of 16x24, 126
                               audio latents) from each reference's own functions: SHA-256 of the float32
                               cos/sin per rotated pair (metadata) and about SAMPLES values of each table
                               (an odd stride through it)

One file per CPU code path (VML_PATHS: `vml-avx512`, `vml-avx2`, `vml-compatible`, `vml-compatible-aten-default`)
for every output that goes through torch's CPU float32 exp/sin/cos (the student's timestep embedding and RoPE
tables, the 19B RoPE tables). torch computes them with MKL's VML, and MKL picks their code by CPU: its AVX-512
code on an Intel CPU with AVX-512, its AVX2 code on an older Intel CPU, its generic code ("COMPATIBLE") on
every other x86-64 CPU, AMD included (older Intel paths give the same values as the generic one). These round
a few near-halfway values to different neighbours (1 ulp apart), so a reference's output is only reproducible
on a CPU that takes the same path; ATEN_CPU_CAPABILITY and NPY_* do not change it. The fourth path is a CPU
without AVX2: ATen's scalar code (ATEN_CPU_CAPABILITY=default), whose float32 `theta ** linspace` (the float32
frequency grid) differs from its SLEEF code. The driver runs those parts once per path, selected by
environment (MKL_CBWR, ATEN_CPU_CAPABILITY); on a non-Intel CPU MKL ignores MKL_CBWR for its Intel paths, so
the driver then preloads a one-line library (built with `cc`) whose `mkl_serv_intel_cpu_true` says yes. Each
file records `vml_probe()` of the process that wrote it, the driver checks that the paths' probes all differ
(each took effect), and the tests use the file whose probe equals their own. The AVX-512 path needs a CPU with
AVX-512.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

# the official tiny model: TINY's widths, two layers, 32 latent channels, the v2 layout over 3 blocks
OFFICIAL_BLOCKS = [(0, 4, 0, 26), (4, 7, 26, 51), (7, 10, 51, 76)]
OFFICIAL = dict(num_layers=2, video_heads=2, video_head_dim=16, audio_heads=2, audio_head_dim=8, caption_channels=24,
                in_channels=32, audio_in_channels=32, grid=(2, 3), video_latents=10, audio_latents=76,
                audio_shape=(2, 16), text_len=7)
# the bidirectional tiny model (ComfyUI needs 8 x 16 audio channels and 128 connector registers)
BIDIR = dict(num_layers=2, video_heads=2, video_head_dim=16, audio_heads=2, audio_head_dim=8, caption_channels=24,
             in_channels=32, audio_in_channels=128, connector_layers=1, connector_heads=2, connector_head_dim=12,
             connector_registers=128, grid=(2, 3), video_latents=3, audio_latents=20, batch=2, text_len=12, fps=24)
# the LTX-2 19B header's convention keys (as ComfyUI / ltx-core read them)
LTX2_HEADER = dict(rope_type="split", frequencies_precision="float64", av_ca_timestep_scale_multiplier=1000.0,
                   causal_temporal_positioning=True, use_middle_indices_grid=True)
# the CPU code paths that give different float32 exp/sin/cos/pow, and the environment that selects each (module doc)
VML_PATHS = {"avx512": {"MKL_CBWR": "AVX512"}, "avx2": {"MKL_CBWR": "AVX2"}, "compatible": {"MKL_CBWR": "COMPATIBLE"},
             "compatible-aten-default": {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "default"}}
VML_PATH = None  # the path this process was started for (--vml-path)
VML_PARTS = ("official", "rope_official", "rope_comfyui", "rope_ltx_core")
QK_SCALE = 3.0  # q/k-norm weights ~ 3: attention logits of std ~9, so a wrong position changes the output
SEED = 20260311


# -- MKL VML code paths ------------------------------------------------------------------------

def vml_file(stem: str) -> str:
    if VML_PATH not in VML_PATHS:
        raise SystemExit(f"run this part with --vml-path one of {', '.join(VML_PATHS)} and its environment "
                         "(the driver does)")
    return f"{stem}.vml-{VML_PATH}.safetensors"


def vml_probe() -> dict:
    """SHA-256 (16 hex digits) of torch's float32 exp, sin, cos and scalar ** tensor on 65536 exactly built
    inputs in the fixtures' ranges: they differ between MKL's VML code paths (exp between all three, sin/cos
    between Intel's and the generic one), and pow between ATen's SLEEF and scalar (ATEN_CPU_CAPABILITY=default)
    paths."""
    import torch
    i = torch.arange(1 << 16, dtype=torch.float32)
    angles, small, unit = i * 0.625 - 20480.0, i * (20.0 / 65536) - 10.0, i / 65536.0  # all exact

    def h(t):
        return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"exp": h(torch.exp(small)), "sin": h(torch.sin(angles)), "cos": h(torch.cos(angles)),
            "pow": h(10000.0 ** unit)}


def _vml_meta(meta: dict) -> dict:
    return {**meta, "vml_path": VML_PATH, "vml_env": VML_PATHS[VML_PATH], "vml_probe": vml_probe()}


def _vml_envs() -> dict:
    """Per code path, the environment that selects it, checked by the probe (module doc)."""
    def distinct(extra: dict) -> bool:
        got = set()
        for name, env in VML_PATHS.items():
            r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--probe"], capture_output=True,
                               text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env, **extra})
            if r.returncode:
                raise SystemExit(f"probe for {name} ({env}) failed:\n{r.stderr[-2000:]}")
            got.add(r.stdout.strip())
        return len(got) == len(VML_PATHS)

    extra = {}
    if not distinct(extra):  # not an Intel CPU: tell MKL it is one
        import tempfile
        src = Path(tempfile.mkdtemp()) / "mkl_intel_cpu.c"
        src.write_text("int mkl_serv_intel_cpu_true(void) { return 1; }\n")
        lib = src.with_suffix(".so")
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
        extra = {"LD_PRELOAD": " ".join(filter(None, (os.environ.get("LD_PRELOAD"), str(lib))))}
        if not distinct(extra):
            raise SystemExit(f"the environments of {', '.join(VML_PATHS)} do not give different probes here, even "
                             "with MKL told the CPU is Intel (the AVX-512 path needs a CPU with AVX-512)")
    return {name: {**env, **extra} for name, env in VML_PATHS.items()}


# -- our side: weights and inputs --------------------------------------------------------------

def _ours():
    sys.path.insert(0, str(ROOT))
    import torch

    from omniforcing_core.config import ConnectorConfig, ModelConfig
    from omniforcing_core.embedded import random_model
    return torch, ConnectorConfig, ModelConfig, random_model


def sharp_bf16_weights(cfg, seed: int) -> dict:
    """Our random weights with q/k-norm weights scaled to QK_SCALE, every value rounded to bfloat16."""
    torch, _, _, random_model = _ours()
    m = random_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for k, v in m.state_dict().items():
        if k.endswith(("q_norm.weight", "k_norm.weight")):
            v = QK_SCALE * (1 + 0.1 * torch.randn(v.shape, generator=g))
        sd[k] = v.to(torch.bfloat16).contiguous()
    return sd


def official_config():
    _, _, ModelConfig, _ = _ours()
    o = OFFICIAL
    return ModelConfig(num_layers=o["num_layers"], video_heads=o["video_heads"], video_head_dim=o["video_head_dim"],
                       audio_heads=o["audio_heads"], audio_head_dim=o["audio_head_dim"],
                       caption_channels=o["caption_channels"], in_channels=o["in_channels"],
                       audio_in_channels=o["audio_in_channels"])


def bidirectional_config():
    _, ConnectorConfig, ModelConfig, _ = _ours()
    b = BIDIR
    conn = ConnectorConfig(num_layers=b["connector_layers"], heads=b["connector_heads"],
                           head_dim=b["connector_head_dim"], num_registers=b["connector_registers"])
    return ModelConfig(num_layers=b["num_layers"], video_heads=b["video_heads"], video_head_dim=b["video_head_dim"],
                       audio_heads=b["audio_heads"], audio_head_dim=b["audio_head_dim"],
                       caption_channels=b["caption_channels"], in_channels=b["in_channels"],
                       audio_in_channels=b["audio_in_channels"], connectors=conn)


def official_inputs() -> dict:
    """Clean and noisy latents (our layout, float64), contexts, per-block sigmas (float32)."""
    torch, *_ = _ours()
    o = OFFICIAL
    g = torch.Generator().manual_seed(SEED + 2)
    h, w = o["grid"]
    c_a, m_a = o["audio_shape"]
    v_shape, a_shape = (1, o["in_channels"], o["video_latents"], h, w), (1, c_a, o["audio_latents"], m_a)
    return {"in.video_clean": torch.randn(v_shape, generator=g, dtype=torch.float64),
            "in.audio_clean": torch.randn(a_shape, generator=g, dtype=torch.float64),
            "in.video_noisy": torch.randn(v_shape, generator=g, dtype=torch.float64),
            "in.audio_noisy": torch.randn(a_shape, generator=g, dtype=torch.float64),
            "in.video_context": torch.randn(1, o["text_len"], o["caption_channels"], generator=g, dtype=torch.float64),
            "in.audio_context": torch.randn(1, o["text_len"], o["caption_channels"], generator=g, dtype=torch.float64),
            # sigma of the block being denoised (one per block), and of the blocks after it
            "in.block_sigmas": torch.tensor([0.90625, 0.7265625, 0.419921875], dtype=torch.float32),
            "in.later_sigma": torch.tensor([0.6], dtype=torch.float32)}


def bidirectional_inputs() -> dict:
    torch, *_ = _ours()
    b = BIDIR
    g = torch.Generator().manual_seed(SEED + 3)
    h, w = b["grid"]
    n = b["batch"]
    return {"in.video": torch.randn(n, b["in_channels"], b["video_latents"], h, w, generator=g),
            "in.audio": torch.randn(n, 8, b["audio_latents"], 16, generator=g),
            "in.text": torch.randn(n, b["text_len"], b["caption_channels"], generator=g),
            "in.sigma": torch.tensor([0.8, 0.35]),
            # per latent frame, different per sample and per modality
            "in.video_sigma_frames": torch.tensor([[0.9, 0.5, 0.2], [0.3, 0.7, 0.1]]),
            "in.audio_sigma_frames": torch.rand(n, b["audio_latents"], generator=g) * 0.9 + 0.05}


def _save(tensors: dict, path: Path, meta: dict) -> None:
    torch, *_ = _ours()
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"fixture": json.dumps(meta, sort_keys=True)})
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")


def _git_rev(path: Path) -> str:
    """The checkout's commit, or (a copy without .git) its folder name and ComfyUI's version file."""
    r = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip()
    version = path / "comfyui_version.py"
    v = version.read_text().split("__version__ =")[-1].strip().strip('"') if version.is_file() else "?"
    return f"no git metadata: folder '{path.name}', version {v}"


def _load_into(model, sd: dict, dtype, strict=True) -> None:
    torch, *_ = _ours()
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False)
    if strict and (missing or unexpected):
        raise SystemExit(f"weights do not fit the reference model: missing {missing[:8]}, unexpected {unexpected[:8]}")


# -- official: ltx-causal -------------------------------------------------------------------------

def _official_path(repo: Path) -> None:
    """ltx-causal and the ltx-core it vendors (its package __init__ imports the wrapper, which imports it)."""
    sys.path[:0] = [str(repo / "LTX-2/packages/ltx-causal/src"), str(repo / "LTX-2/packages/ltx-core/src")]


def part_official(repo: Path, out: Path) -> None:
    torch, *_ = _ours()
    _official_path(repo)
    from ltx_causal.transformer.causal_model import CausalLTXModel, CausalLTXModelConfig

    o = OFFICIAL
    h, w = o["grid"]
    cfg = CausalLTXModelConfig(num_layers=o["num_layers"], video_dim=o["video_heads"] * o["video_head_dim"],
                               audio_dim=o["audio_heads"] * o["audio_head_dim"], video_heads=o["video_heads"],
                               audio_heads=o["audio_heads"], video_d_head=o["video_head_dim"],
                               audio_d_head=o["audio_head_dim"], cross_attention_dim=o["video_heads"] * o["video_head_dim"],
                               audio_cross_attention_dim=o["audio_heads"] * o["audio_head_dim"],
                               in_channels=o["in_channels"], out_channels=o["in_channels"],
                               caption_channels=o["caption_channels"], video_frame_seqlen=h * w)
    model = CausalLTXModel(cfg).double().eval()
    if not (out / "official_causal.safetensors").is_file():
        raise SystemExit(f"no {out / 'official_causal.safetensors'}: the driver writes it (write_official_inputs)")
    fx = _load(out / "official_causal.safetensors")  # one set of weights and inputs for every code path
    sd = {k[2:]: v for k, v in fx.items() if k.startswith("w.")}
    x = {k: v for k, v in fx.items() if k.startswith("in.")}
    _load_into(model, sd, torch.float64)
    for blk in model.transformer_blocks:
        blk._store_gate_stats = False

    def to_official_v(v):  # ours [B, C, F, H, W] -> official [B, F, C, H, W]
        return v.permute(0, 2, 1, 3, 4).contiguous()

    def to_official_a(a):  # ours [B, C, T, M] -> official [B, T, C*M]
        return a.permute(0, 2, 1, 3).reshape(a.shape[0], a.shape[2], -1).contiguous()

    def from_official_v(v):
        return v.permute(0, 2, 1, 3, 4).contiguous()

    def from_official_a(a):
        c, m = o["audio_shape"]
        return a.reshape(a.shape[0], a.shape[1], c, m).permute(0, 2, 1, 3).contiguous()

    blocks = OFFICIAL_BLOCKS
    vctx, actx = x["in.video_context"], x["in.audio_context"]
    outs = {k: torch.zeros_like(x[f"in.{m}_noisy"]) for k, m in
            (("out.masked.video", "video"), ("out.masked.audio", "audio"), ("out.kv.video", "video"),
             ("out.kv.audio", "audio"))}
    later = float(x["in.later_sigma"][0])
    with torch.no_grad():
        # masked path: block k noisy at its sigma, history clean at sigma 0, later blocks noisy at `later`
        for k, (vs, ve, as_, ae) in enumerate(blocks):
            sk = float(x["in.block_sigmas"][k])
            v = x["in.video_clean"].clone()
            a = x["in.audio_clean"].clone()
            v[:, :, vs:], a[:, :, as_:] = x["in.video_noisy"][:, :, vs:], x["in.audio_noisy"][:, :, as_:]
            sv = torch.zeros(1, o["video_latents"])
            sv[:, vs:ve], sv[:, ve:] = sk, later
            sa = torch.zeros(1, o["audio_latents"])
            sa[:, as_:ae], sa[:, ae:] = sk, later
            ov, oa = model(to_official_v(v), to_official_a(a), sv, vctx, actx, audio_timesteps=sa)
            outs["out.masked.video"][:, :, vs:ve] = from_official_v(ov)[:, :, vs:ve]
            outs["out.masked.audio"][:, :, as_:ae] = from_official_a(oa)[:, :, as_:ae]
        # KV path: each block denoised once against the cache, then re-run clean at sigma 0 (cache refresh)
        caches = model.init_av_kv_caches(1, o["video_latents"], o["audio_latents"], o["text_len"],
                                         torch.device("cpu"), torch.float64)
        for k, (vs, ve, as_, ae) in enumerate(blocks):
            sk = float(x["in.block_sigmas"][k])
            vb, ab = x["in.video_noisy"][:, :, vs:ve], x["in.audio_noisy"][:, :, as_:ae]
            ov, oa = model(to_official_v(vb), to_official_a(ab), torch.full((1, ve - vs), sk), vctx, actx,
                           audio_timesteps=torch.full((1, ae - as_), sk), kv_caches=caches,
                           current_video_start_frame=vs, current_audio_start_frame=as_)
            outs["out.kv.video"][:, :, vs:ve] = from_official_v(ov)
            outs["out.kv.audio"][:, :, as_:ae] = from_official_a(oa)
            vc, ac = x["in.video_clean"][:, :, vs:ve], x["in.audio_clean"][:, :, as_:ae]
            model(to_official_v(vc), to_official_a(ac), torch.zeros(1, ve - vs), vctx, actx,
                  audio_timesteps=torch.zeros(1, ae - as_), kv_caches=caches,
                  current_video_start_frame=vs, current_audio_start_frame=as_)
    _save(outs, out / vml_file("official_causal"), _vml_meta(_official_meta(repo)))


def _official_meta(repo: Path) -> dict:
    return {"reference": "OmniForcing ltx-causal CausalLTXModel (forward masked; forward with kv_caches)",
            "commit": _git_rev(repo), "dtype": "float64", "blocks": OFFICIAL_BLOCKS, "config": OFFICIAL,
            "qk_scale": QK_SCALE, "seed": SEED}


def write_official_inputs(out: Path, repo: Path) -> None:
    """The student's weights and inputs, made once (torch.randn's values depend on ATEN_CPU_CAPABILITY too) and
    read by part_official on every code path."""
    sd = sharp_bf16_weights(official_config(), SEED)
    _save({**{f"w.{k}": v for k, v in sd.items()}, **official_inputs()}, out / "official_causal.safetensors",
          _official_meta(repo))


# -- ComfyUI: LTXAVModel ----------------------------------------------------------------------

def _comfy_import(repo: Path):
    sys.path.insert(0, str(repo))
    os.chdir(repo)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.ldm.lightricks.av_model import LTXAVModel
    return comfy, LTXAVModel


def comfy_model(repo: Path, header: dict):
    torch, *_ = _ours()
    comfy, LTXAVModel = _comfy_import(repo)
    b = BIDIR
    return LTXAVModel(in_channels=b["in_channels"], audio_in_channels=b["audio_in_channels"],
                      cross_attention_dim=b["video_heads"] * b["video_head_dim"],
                      audio_cross_attention_dim=b["audio_heads"] * b["audio_head_dim"],
                      attention_head_dim=b["video_head_dim"], audio_attention_head_dim=b["audio_head_dim"],
                      num_attention_heads=b["video_heads"], audio_num_attention_heads=b["audio_heads"],
                      caption_channels=b["caption_channels"], num_layers=b["num_layers"],
                      connector_attention_head_dim=b["connector_head_dim"],
                      connector_num_attention_heads=b["connector_heads"], connector_num_layers=b["connector_layers"],
                      dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init, **header)


def part_comfyui(repo: Path, out: Path) -> None:
    torch, *_ = _ours()
    sd = {k[2:]: v for k, v in _load(out / "bidirectional_weights.safetensors").items() if k.startswith("w.")}
    x = {k: v for k, v in _load(out / "bidirectional_weights.safetensors").items() if k.startswith("in.")}
    b = BIDIR
    tpf = b["grid"][0] * b["grid"][1]
    outs = {}
    for name, header in (("default", {}), ("header", LTX2_HEADER)):
        model = comfy_model(repo, header).eval()
        _load_into(model, sd, torch.float32)
        with torch.no_grad():
            ctx = model.preprocess_text_embeds(x["in.text"], unprocessed=True)  # raw text through the connectors
            for case, (vt, at) in (("scalar", (x["in.sigma"], x["in.sigma"])),
                                   ("token", (x["in.video_sigma_frames"].repeat_interleave(tpf, 1),
                                              x["in.audio_sigma_frames"]))):
                ov, oa = model([x["in.video"], x["in.audio"]], (vt, at), ctx, frame_rate=b["fps"],
                               transformer_options={})
                outs[f"out.{name}.{case}.video"], outs[f"out.{name}.{case}.audio"] = ov, oa
    meta = {"reference": "ComfyUI comfy.ldm.lightricks.av_model.LTXAVModel (preprocess_text_embeds, forward)",
            "commit": _git_rev(repo), "dtype": "float32", "frame_rate": b["fps"], "config": BIDIR,
            "cases": {"default": "constructor defaults (a header-less file)", "header": LTX2_HEADER}}
    _save(outs, out / "comfyui.safetensors", meta)


# -- ltx-core: LTXModel -----------------------------------------------------------------------------

def _ltx_core_import(repo: Path):
    """ltx-core's transformer and its text connector, without importing its Gemma encoder (transformers)."""
    import importlib.util
    import types
    src = repo / "packages/ltx-core/src"
    sys.path.insert(0, str(src))
    for pkg in ("ltx_core.text_encoders", "ltx_core.text_encoders.gemma"):  # skip the packages' __init__
        mod = types.ModuleType(pkg)
        mod.__path__ = [str(src / pkg.replace(".", "/"))]
        sys.modules[pkg] = mod
    name = "ltx_core.text_encoders.gemma.embeddings_connector"
    spec = importlib.util.spec_from_file_location(name, src / (name.replace(".", "/") + ".py"))
    conn = importlib.util.module_from_spec(spec)
    sys.modules[name] = conn
    spec.loader.exec_module(conn)
    from ltx_core.components.patchifiers import AudioPatchifier, VideoLatentPatchifier, get_pixel_coords
    from ltx_core.model.transformer.model import LTXModel, LTXModelType
    from ltx_core.model.transformer.modality import Modality
    from ltx_core.model.transformer.rope import LTXRopeType
    from ltx_core.model.transformer.text_projection import PixArtAlphaTextProjection
    from ltx_core.types import AudioLatentShape, SpatioTemporalScaleFactors, VideoLatentShape
    return locals()


def part_ltx_core(repo: Path, out: Path) -> None:
    torch, *_ = _ours()
    L = _ltx_core_import(repo)
    wfile = _load(out / "bidirectional_weights.safetensors")
    sd = {k[2:]: v.float() for k, v in wfile.items() if k.startswith("w.")}
    x = {k: v for k, v in wfile.items() if k.startswith("in.")}
    b = BIDIR
    dv, da = b["video_heads"] * b["video_head_dim"], b["audio_heads"] * b["audio_head_dim"]
    model = L["LTXModel"](model_type=L["LTXModelType"].AudioVideo, num_attention_heads=b["video_heads"],
                          attention_head_dim=b["video_head_dim"], in_channels=b["in_channels"],
                          out_channels=b["in_channels"], num_layers=b["num_layers"], cross_attention_dim=dv,
                          audio_num_attention_heads=b["audio_heads"], audio_attention_head_dim=b["audio_head_dim"],
                          audio_in_channels=b["audio_in_channels"], audio_out_channels=b["audio_in_channels"],
                          audio_cross_attention_dim=da, use_middle_indices_grid=True,
                          av_ca_timestep_scale_multiplier=LTX2_HEADER["av_ca_timestep_scale_multiplier"],
                          rope_type=L["LTXRopeType"](LTX2_HEADER["rope_type"]), double_precision_rope=True,
                          caption_projection=L["PixArtAlphaTextProjection"](b["caption_channels"], dv),
                          audio_caption_projection=L["PixArtAlphaTextProjection"](b["caption_channels"], da)).eval()
    conns = {}
    for side in ("video", "audio"):
        c = L["conn"].Embeddings1DConnector(attention_head_dim=b["connector_head_dim"],
                                            num_attention_heads=b["connector_heads"], num_layers=b["connector_layers"],
                                            positional_embedding_max_pos=[4096], num_learnable_registers=128,
                                            rope_type=L["LTXRopeType"](LTX2_HEADER["rope_type"]),
                                            double_precision_rope=True).eval()
        pre = f"{side}_embeddings_connector."
        _load_into(c, {k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}, torch.float32)
        conns[side] = c
    _load_into(model, {k: v for k, v in sd.items() if "embeddings_connector." not in k}, torch.float32)
    n, h, w = b["batch"], *b["grid"]
    fv, ta = b["video_latents"], b["audio_latents"]
    vpatch, apatch = L["VideoLatentPatchifier"](1), L["AudioPatchifier"](1)
    vshape = L["VideoLatentShape"](n, b["in_channels"], fv, h, w)
    vpos = L["get_pixel_coords"](vpatch.get_patch_grid_bounds(vshape), L["SpatioTemporalScaleFactors"](8, 32, 32),
                                 causal_fix=True).float()
    vpos[:, 0, ...] = vpos[:, 0, ...] / float(b["fps"])  # as ltx-core's VideoLatentTools.create_initial_state
    apos = apatch.get_patch_grid_bounds(L["AudioLatentShape"](n, 8, ta, 16))
    text = x["in.text"]
    pad = 1024 - text.shape[1]  # ltx-core's connector wants registers-aligned lengths: right-pad, mask the padding
    padded = torch.cat([text, torch.zeros(n, pad, text.shape[2])], 1)
    mask = torch.zeros(n, 1, 1, 1024)
    mask[..., text.shape[1]:] = -torch.finfo(torch.float32).max
    outs = {}
    with torch.no_grad():
        vctx, _ = conns["video"](padded, mask)
        actx, _ = conns["audio"](padded, mask)
        for case, (vt, at) in (("scalar", (x["in.sigma"][:, None].expand(n, fv * h * w),
                                           x["in.sigma"][:, None].expand(n, ta))),
                               ("token", (x["in.video_sigma_frames"].repeat_interleave(h * w, 1),
                                          x["in.audio_sigma_frames"]))):
            video = L["Modality"](latent=vpatch.patchify(x["in.video"]), sigma=vt.amax(1), timesteps=vt,
                                  positions=vpos, context=vctx)
            audio = L["Modality"](latent=apatch.patchify(x["in.audio"]), sigma=at.amax(1), timesteps=at,
                                  positions=apos, context=actx)
            ov, oa = model(video, audio, None)
            outs[f"out.{case}.video"] = ov.reshape(n, fv, h, w, -1).permute(0, 4, 1, 2, 3)
            outs[f"out.{case}.audio"] = apatch.unpatchify(oa, L["AudioLatentShape"](n, 8, ta, 16))
    meta = {"reference": "ltx-core LTXModel + Embeddings1DConnector (Lightricks/LTX-2)", "commit": _git_rev(repo),
            "dtype": "float32", "fps": b["fps"], "config": BIDIR, "header": LTX2_HEADER,
            "modality_sigma": "per sample: the maximum of its timesteps (the step's sigma for 0/1 denoise masks)"}
    _save(outs, out / "ltx_core.safetensors", meta)


# -- RoPE tables at the 19B sizes -----------------------------------------------------------------

R19 = dict(video_dim=4096, audio_dim=2048, cross_dim=2048, heads=32, frames=16, grid=(16, 24), audio=126, fps=24,
           blocks=[(0, 4, 0, 26), (4, 7, 26, 51), (7, 10, 51, 76), (10, 13, 76, 101), (13, 16, 101, 126)])
SAMPLES = 1024  # values sampled from each table


def canonical(cos, sin, layout: str, heads: int):
    """[T, D/2] float32 cos and sin, one per rotated pair: interleaved [.., T, D] -> every other column;
    ltx-core split [B, H, T, D/2H] -> [T, H*D/2H]."""
    torch, *_ = _ours()
    if layout == "interleaved":
        return (cos.reshape(-1, cos.shape[-1])[:, ::2].float().contiguous(),
                sin.reshape(-1, sin.shape[-1])[:, ::2].float().contiguous())
    return (cos[0].transpose(0, 1).reshape(cos.shape[2], -1).float().contiguous(),
            sin[0].transpose(0, 1).reshape(sin.shape[2], -1).float().contiguous())


def digest(t) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _record(tabs: dict, name: str, cos, sin) -> None:
    stride = (cos.numel() // SAMPLES) | 1  # odd: the sample walks across the columns (powers of two wide)
    tabs["hash"][name] = {"cos": digest(cos), "sin": digest(sin), "shape": list(cos.shape), "sample_stride": stride}
    tabs["tensors"][f"{name}.cos"] = cos.flatten()[::stride].clone()
    tabs["tensors"][f"{name}.sin"] = sin.flatten()[::stride].clone()


def part_rope_official(repo: Path, out: Path) -> None:
    torch, *_ = _ours()
    _official_path(repo)
    from ltx_causal.rope.causal_rope import causal_precompute_freqs_cis
    r = R19
    h, w = r["grid"]
    tabs = {"hash": {}, "tensors": {}}
    spans = [("full", 0, r["frames"], 0, r["audio"])] + [(f"block{k}", *b) for k, b in enumerate(r["blocks"])]
    for name, vs, ve, as_, ae in spans:
        kw = dict(theta=10000.0, device="cpu", dtype=torch.float32)
        v = causal_precompute_freqs_cis(torch.tensor([[ve - vs, h, w]]), r["video_dim"], max_pos=[20, 2048, 2048],
                                        start_frame=vs, **kw)
        a = causal_precompute_freqs_cis(torch.tensor([[ae - as_]]), r["audio_dim"], max_pos=[20], start_frame=as_,
                                        is_audio=True, **kw)
        vc = causal_precompute_freqs_cis(torch.tensor([[ve - vs]]), r["cross_dim"], max_pos=[20], start_frame=vs,
                                         is_audio=False, **kw)
        vc = tuple(t.unsqueeze(2).expand(-1, -1, h * w, -1).reshape(1, -1, t.shape[-1]) for t in vc)  # as the model
        ac = causal_precompute_freqs_cis(torch.tensor([[ae - as_]]), r["cross_dim"], max_pos=[20], start_frame=as_,
                                         is_audio=True, **kw)
        for kind, (cos, sin) in (("video_self", v), ("audio_self", a), ("video_cross", vc), ("audio_cross", ac)):
            _record(tabs, f"official.{name}.{kind}", *canonical(cos, sin, "interleaved", r["heads"]))
    meta = {"reference": "ltx-causal causal_precompute_freqs_cis (start_frame per block)", "commit": _git_rev(repo),
            "sizes": R19, "hashes": tabs["hash"]}
    _save(tabs["tensors"], out / vml_file("rope19b_official"), _vml_meta(meta))


def part_rope_comfyui(repo: Path, out: Path) -> None:
    torch, *_ = _ours()
    comfy, _ = _comfy_import(repo)
    from comfy.ldm.lightricks import model as lm
    from comfy.ldm.lightricks.symmetric_patchifier import AudioPatchifier, SymmetricPatchifier, latent_to_pixel_coords
    r = R19
    h, w = r["grid"]
    tabs = {"hash": {}, "tensors": {}}
    for name, header in (("default", {}), ("header", LTX2_HEADER)):
        split = header.get("rope_type") == "split"

        class Stub:  # the attributes LTXBaseModel._precompute_freqs_cis reads
            split_positional_embedding = lm.LTXRopeType.SPLIT if split else lm.LTXRopeType.INTERLEAVED
            freq_grid_generator = staticmethod(lm.generate_freq_grid_np if header.get("frequencies_precision") ==
                                               "float64" else lm.generate_freq_grid_pytorch)
        stub, middle = Stub(), bool(header.get("use_middle_indices_grid", False))
        pre = lambda *a, **k: lm.LTXBaseModel._precompute_freqs_cis(stub, *a, **k)  # noqa: E731
        vx = torch.zeros(1, 1, r["frames"], h, w)
        _, lat = SymmetricPatchifier(1, start_end=True).patchify(vx)
        pix = latent_to_pixel_coords(lat, (8, 32, 32), causal_fix=bool(header.get("causal_temporal_positioning")))
        coords = pix.to(torch.float32)
        coords[:, 0] = coords[:, 0] * (1.0 / r["fps"])  # LTXBaseModel._prepare_positional_embeddings
        v = pre(coords, dim=r["video_dim"], out_dtype=torch.float32, max_pos=[20, 2048, 2048],
                use_middle_indices_grid=middle, num_attention_heads=r["heads"])
        _, alat = AudioPatchifier(1, start_end=True).patchify(torch.zeros(1, 8, r["audio"], 16))
        a = pre(alat, dim=r["audio_dim"], out_dtype=torch.float32, max_pos=[20], use_middle_indices_grid=middle,
                num_attention_heads=r["heads"])
        vc = pre(coords[:, 0:1, :], dim=r["cross_dim"], out_dtype=torch.float32, max_pos=[20],
                 use_middle_indices_grid=True, num_attention_heads=r["heads"])
        ac = pre(alat[:, 0:1, :], dim=r["cross_dim"], out_dtype=torch.float32, max_pos=[20],
                 use_middle_indices_grid=True, num_attention_heads=r["heads"])
        for kind, (mat, _) in (("video_self", v), ("audio_self", a), ("video_cross", vc), ("audio_cross", ac)):
            cos, sin = mat[..., 0, 0], mat[..., 1, 0]  # [B, T, H, D/2H] rotation matrices (cos, -sin; sin, cos)
            _record(tabs, f"comfyui.{name}.{kind}", cos[0].reshape(cos.shape[1], -1).contiguous(),
                    sin[0].reshape(sin.shape[1], -1).contiguous())
    meta = {"reference": "ComfyUI LTXBaseModel._precompute_freqs_cis with its patchifier positions",
            "commit": _git_rev(repo), "sizes": R19, "hashes": tabs["hash"],
            "cases": {"default": "constructor defaults", "header": LTX2_HEADER}}
    _save(tabs["tensors"], out / vml_file("rope19b_comfyui"), _vml_meta(meta))


def part_rope_ltx_core(repo: Path, out: Path) -> None:
    torch, *_ = _ours()
    L = _ltx_core_import(repo)
    from ltx_core.model.transformer import rope as lr
    r = R19
    h, w = r["grid"]
    tabs = {"hash": {}, "tensors": {}}
    vpatch, apatch = L["VideoLatentPatchifier"](1), L["AudioPatchifier"](1)
    vpos = L["get_pixel_coords"](vpatch.get_patch_grid_bounds(L["VideoLatentShape"](1, 128, r["frames"], h, w)),
                                 L["SpatioTemporalScaleFactors"](8, 32, 32), causal_fix=True).float()
    vpos[:, 0, ...] = vpos[:, 0, ...] / float(r["fps"])
    apos = apatch.get_patch_grid_bounds(L["AudioLatentShape"](1, 8, r["audio"], 16))
    kw = dict(out_dtype=torch.float32, theta=10000.0, use_middle_indices_grid=True, num_attention_heads=r["heads"],
              rope_type=lr.LTXRopeType.SPLIT, freq_grid_generator=lr.generate_freq_grid_np)
    tables = {"video_self": lr.precompute_freqs_cis(vpos, dim=r["video_dim"], max_pos=[20, 2048, 2048], **kw),
              "audio_self": lr.precompute_freqs_cis(apos, dim=r["audio_dim"], max_pos=[20], **kw),
              "video_cross": lr.precompute_freqs_cis(vpos[:, 0:1, :], dim=r["cross_dim"], max_pos=[20], **kw),
              "audio_cross": lr.precompute_freqs_cis(apos[:, 0:1, :], dim=r["cross_dim"], max_pos=[20], **kw)}
    for kind, (cos, sin) in tables.items():
        _record(tabs, f"ltx_core.header.{kind}", *canonical(cos, sin, "split", r["heads"]))
    meta = {"reference": "ltx-core precompute_freqs_cis with its patchifier positions (LTX-2 header: split, "
                         "float64 grid, causal fix, middle)", "commit": _git_rev(repo), "sizes": R19,
            "hashes": tabs["hash"]}
    _save(tabs["tensors"], out / vml_file("rope19b_ltx_core"), _vml_meta(meta))


# -- driver -------------------------------------------------------------------------------------------

def _load(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def write_bidirectional_weights(out: Path) -> None:
    torch, *_ = _ours()
    sd = sharp_bf16_weights(bidirectional_config(), SEED + 10)
    _save({**{f"w.{k}": v for k, v in sd.items()}, **bidirectional_inputs()}, out / "bidirectional_weights.safetensors",
          {"config": BIDIR, "qk_scale": QK_SCALE, "seed": SEED + 10,
           "note": "weights bfloat16 (exact in float32), inputs float32; shared by comfyui and ltx_core"})


PARTS = {"official": part_official, "comfyui": part_comfyui, "ltx_core": part_ltx_core,
         "rope_official": part_rope_official, "rope_comfyui": part_rope_comfyui, "rope_ltx_core": part_rope_ltx_core}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--omniforcing", type=Path, help="checkout of github.com/OmniForcing/OmniForcing")
    p.add_argument("--comfyui", type=Path, help="checkout of ComfyUI (783545f6)")
    p.add_argument("--ltx2", type=Path, help="checkout of github.com/Lightricks/LTX-2 (optional)")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--only", help=f"comma-separated parts to write ({', '.join(sorted(PARTS))}); default all")
    p.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)  # one part, in this process
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # print vml_probe() as JSON
    p.add_argument("--vml-path", choices=sorted(VML_PATHS), help=argparse.SUPPRESS)  # with its environment
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    out = a.out.resolve()
    if a.probe:
        print(json.dumps(vml_probe(), sort_keys=True))
        return 0
    if a.part:
        global VML_PATH
        VML_PATH = a.vml_path
        torch, *_ = _ours()
        torch.set_num_threads(1)
        repo = {"official": a.omniforcing, "rope_official": a.omniforcing, "comfyui": a.comfyui,
                "rope_comfyui": a.comfyui, "ltx_core": a.ltx2, "rope_ltx_core": a.ltx2}[a.part]
        PARTS[a.part](repo.resolve(), out)
        return 0
    if not a.omniforcing or not a.comfyui:
        p.error("--omniforcing and --comfyui are required (--ltx2 is optional)")
    out.mkdir(parents=True, exist_ok=True)
    todo = ["official", "rope_official", "comfyui", "rope_comfyui"] + (["ltx_core", "rope_ltx_core"] if a.ltx2 else [])
    if a.only:
        only = a.only.split(",")
        if set(only) - set(PARTS):
            p.error(f"--only: unknown part(s) {sorted(set(only) - set(PARTS))}")
        todo = [t for t in todo if t in only]
    if not a.only or not (out / "bidirectional_weights.safetensors").is_file():
        write_bidirectional_weights(out)
    if "official" in todo and (not a.only or not (out / "official_causal.safetensors").is_file()):
        write_official_inputs(out, a.omniforcing.resolve())
    envs = _vml_envs() if set(todo) & set(VML_PARTS) else {}
    for part in todo:
        args = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--out", str(out)]
        for flag, val in (("--omniforcing", a.omniforcing), ("--comfyui", a.comfyui), ("--ltx2", a.ltx2)):
            if val:
                args += [flag, str(Path(val).resolve())]
        for path in VML_PATHS if part in VML_PARTS else (None,):
            print(f"[{part}{f' {path}: {VML_PATHS[path]}' if path else ''}]", flush=True)
            r = subprocess.run(args + (["--vml-path", path] if path else []),
                               env={**os.environ, "OMP_NUM_THREADS": "1", **envs.get(path, {})})
            if r.returncode:
                print(f"part {part} failed ({r.returncode})", file=sys.stderr)
                return r.returncode
    if not a.ltx2:
        print("no --ltx2: ltx_core fixtures not written (tests for them skip)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
