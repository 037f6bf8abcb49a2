"""From Native MODEL takes its conventions from the ComfyUI model it wraps: ComfyUI's own LTXAVModel
(783545f6), run through our transformer with the preset the node picks, gives ComfyUI's own forward
(fp32 rounding), with ComfyUI's defaults and with an LTX-2 header. A subprocess keeps ComfyUI's imports
out of this test session."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import COMFYUI_DIR, needs_comfyui

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import json, sys
from pathlib import Path
repo, comfy_dir, packs = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
sys.path.insert(0, str(repo / "tests" / "reference"))
import torch
torch.set_num_threads(1)
import make_fixtures as mf
from safetensors.torch import load_file
w = load_file(str(repo / "tests" / "reference" / "bidirectional_weights.safetensors"))
sd = {k[2:]: v.float() for k, v in w.items() if k.startswith("w.")}
out = {}
for name, header, preset in (("default", {}, "auto"), ("header", mf.LTX2_HEADER, "auto"),
                             ("student", {}, "omniforcing-student")):
    dm = mf.comfy_model(comfy_dir, header).eval()
    dm.load_state_dict(sd)
    sys.path.insert(0, packs)
    import importlib
    L = importlib.import_module("ofpack.nodes.loader")
    adopt = importlib.import_module("ofpack.nodes.sharing").adopt_modules
    Model = importlib.import_module("ofpack.omniforcing_core.model").OmniForcingTransformer
    cfg, conv, _ = L.native_config(dm, L._conventions("auto", "auto", "auto", preset), dict(header))
    with torch.device("meta"):
        ours = Model(cfg)
    adopt(ours, dm)
    ours.eval()
    x = w
    rel = {}
    with torch.no_grad():
        ctx = dm.preprocess_text_embeds(x["in.text"], unprocessed=True)
        vctx, actx = ours.encode_text(x["in.text"])
        text = ours.text_kv(vctx, actx)
        tpf = x["in.video"].shape[3] * x["in.video"].shape[4]
        for case, theirs_s, ours_s in (
                ("scalar", (x["in.sigma"], x["in.sigma"]), (x["in.sigma"], x["in.sigma"])),
                ("token", (x["in.video_sigma_frames"].repeat_interleave(tpf, 1), x["in.audio_sigma_frames"]),
                 (x["in.video_sigma_frames"], x["in.audio_sigma_frames"]))):
            rv, ra = dm([x["in.video"], x["in.audio"]], theirs_s, ctx, frame_rate=24, transformer_options={})
            v, a = ours(x["in.video"], x["in.audio"], *ours_s, text)
            rel[case] = [((v - rv).norm() / rv.norm()).item(), ((a - ra).norm() / ra.norm()).item()]
    out[name] = {"based_on": conv.based_on, "rel": rel}
print(json.dumps(out))
'''


@needs_comfyui
def test_from_native_model_matches_comfyuis_own_forward(tmp_path):
    packs = tmp_path / "packs"
    packs.mkdir()
    (packs / "ofpack").symlink_to(REPO, target_is_directory=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO), str(COMFYUI_DIR), str(packs)], capture_output=True,
                       text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("default", "header"):
        assert "comfyui" in str(res[name]["based_on"]), res
        for case, (video, audio) in res[name]["rel"].items():
            assert video < 1e-6 and audio < 1e-6, (name, case, res)
    # negative control: the same model forced to the student's conventions is far from ComfyUI's forward
    assert max(res["student"]["rel"]["scalar"] + res["student"]["rel"]["token"]) > 1e-4, res["student"]
