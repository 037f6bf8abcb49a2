"""The pack inside a real, headless ComfyUI: registration, the example workflows on tiny models, bad
inputs, cancel during a stream, and numeric checks against ComfyUI's own LTX-2 VAE classes."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from conftest import needs_comfyui
from host import error_text, load_api_workflow, nodes_of, status_messages, tinyfy

pytestmark = needs_comfyui

NODE_IDS = ["OmniForcingModelLoader", "OmniForcingFromNativeModel", "OmniForcingPromptAt",
            "OmniForcingPromptSchedule", "OmniForcingSampler", "OmniForcingStream", "OmniForcingMux",
            "OmniForcingToyModel", "OmniForcingToyTextEncode", "OmniForcingToyDecode", "OmniForcingToyWorldClip"]
WORKFLOW_NAMES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
FPS = 24


def probe(path: Path):
    from omniforcing_core.media import probe_media

    assert path.is_file(), f"{path} was not written"
    return probe_media(path)


def tensors(host, name):
    from safetensors.torch import load_file

    return load_file(str(host.output / "tensors" / f"{name}.safetensors"))


# -- registration ------------------------------------------------------------------------------------

def test_every_node_is_registered_with_tooltips(host):
    info = host.get("/object_info")
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"not registered (import failure?): {missing}\n{host.log_tail()}"
    for n in NODE_IDS:
        for section in ("required", "optional"):
            for name, spec in info[n]["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{n}.{name} has no tooltip"
    assert "IMPORT FAILED" not in host.log_path.read_text(errors="replace")


def test_web_extension_and_templates_are_served(host):
    js = host.get("/extensions/omniforcing/omniforcing_stream.js")
    assert b"omniforcing.stream" in js
    templates = host.get("/workflow_templates")
    assert sorted(templates.get("omniforcing", [])) == sorted(WORKFLOW_NAMES)
    for name in WORKFLOW_NAMES:
        ui = host.get(f"/api/workflow_templates/omniforcing/{name}.json")
        ui = json.loads(ui) if isinstance(ui, bytes) else ui
        assert {n["type"] for n in ui["nodes"]} & {"OmniForcingModelLoader", "OmniForcingToyModel"}


def test_loader_lists_files_indexes_and_shard_folders(host):
    opts = host.get("/object_info/OmniForcingModelLoader")["OmniForcingModelLoader"]["input"]["required"]
    listed = opts["generator"][1]["options"]
    assert "omniforcing/omniforcing_ltx2_5s_causal/" in listed  # a folder of shards + index
    assert "checkpoints/ltx-2-19b-dev.safetensors" in listed
    assert not any("-00001-of-" in x or x.endswith("index.json") for x in listed), "list the folder, not its parts"


# -- the example workflows ---------------------------------------------------------------------------

def test_text_to_audio_video_workflow(host):
    g = tinyfy(load_api_workflow("omniforcing_t2av_5s"), seconds=2)
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    (save,) = nodes_of(g, "SaveVideo")
    (mp4,) = host.output_files(entry, save)
    info = probe(mp4)
    assert info.num_streams == 2 and (info.video.codec, info.audio.codec) == ("h264", "aac")
    assert (info.video.width, info.video.height) == (64, 64)
    assert info.video.frames == 1 + 24 * 2
    assert info.audio.duration == pytest.approx(2.01, abs=0.03)  # (4T-3) mel frames of 10 ms


def test_image_to_audio_video_workflow_with_unprocessed_text(host):
    g = tinyfy(load_api_workflow("omniforcing_i2av"), seconds=2, text_mode="unprocessed")
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    (mux,) = nodes_of(g, "OmniForcingMux")
    (mp4,) = host.output_files(entry, mux)
    info = probe(mp4)
    assert info.num_streams == 2 and info.video.frames == 49 and info.audio.sample_rate == 24000


def test_toy_workflow_runs_the_embedded_student_like_the_core(host):
    """The no-download example: the shipped toy student through ComfyUI's model management gives the
    same latents as the core library's own run, and a playable 5 s clip."""
    import torch

    from omniforcing_core.toy.default import load_default
    from omniforcing_core.layout import make_clip
    from omniforcing_core.sampling import generate

    g = load_api_workflow("omniforcing_toy_demo")
    (sampler,) = nodes_of(g, "OmniForcingSampler")
    (dec,) = nodes_of(g, "OmniForcingToyDecode")
    (enc,) = nodes_of(g, "OmniForcingToyTextEncode")
    g["90"] = {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": "toy", "latent": [sampler, 0], "image": [dec, 0], "audio": [dec, 1]}}
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    (save,) = nodes_of(g, "SaveVideo")
    (mp4,) = host.output_files(entry, save)
    info = probe(mp4)
    assert info.num_streams == 2 and info.video.frames == 121 and (info.video.width, info.video.height) == (128, 128)
    assert info.audio.duration == pytest.approx(5.01, abs=0.03) and abs(info.av_drift) < 1 / FPS

    d = load_default()
    s = g[sampler]["inputs"]
    clip = make_clip(d.layout, s["height"], s["width"], seconds=s["seconds"], seed=s["seed"])
    with torch.no_grad():
        v, a = generate(d.model, clip, d.text(g[enc]["inputs"]["text"]))
    t = tensors(host, "toy")
    assert t["video_latent"].shape == v.shape and t["audio_latent"].shape == a.shape
    # float32 rounding, not bit for bit: the core's plain Linear layers run the feed-forward as one fused
    # matmul+GELU, ComfyUI's casting layers do not (seen: 2e-4 on latents of unit scale)
    assert (t["video_latent"] - v).abs().max() < 1e-3 and (t["audio_latent"] - a).abs().max() < 1e-3
    want = d.decode_video(v)[0].permute(1, 2, 3, 0)
    assert t["image"].shape == want.shape and (t["image"] - want).abs().max() < 1e-3
    assert t["audio"].shape == (1, 2, (4 * a.shape[2] - 3) * 240)


def test_toy_text_encode_refuses_an_empty_caption(host):
    g = load_api_workflow("omniforcing_toy_demo")
    (enc,) = nodes_of(g, "OmniForcingToyTextEncode")
    g[enc]["inputs"]["text"] = "   "
    entry = host.run(g)
    assert entry["status"]["status_str"] == "error"
    assert "caption is empty" in error_text(entry)


class Websocket:
    """Collects what `pick` makes of each websocket message ComfyUI sends this client (None: skipped);
    aiohttp ships with ComfyUI."""

    def __init__(self, host, pick):
        self.items, self.pick = [], pick
        self.url = host.url.replace("http", "ws") + f"/ws?clientId={host.client_id}"
        self.ready, self._stop = threading.Event(), False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(20), "websocket did not connect"

    def _run(self):
        import asyncio

        import aiohttp

        async def main():
            async with aiohttp.ClientSession() as s, s.ws_connect(self.url) as ws:
                self.ready.set()
                while not self._stop:
                    try:
                        msg = await ws.receive(timeout=0.5)
                    except asyncio.TimeoutError:
                        continue
                    if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                        break
                    item = self.pick(msg)
                    if item is not None:
                        self.items.append(item)
        asyncio.run(main())

    def close(self):
        self._stop = True
        self.thread.join(5)


def stream_event(msg):
    """Our 'omniforcing.stream' events (text messages)."""
    import aiohttp

    if msg.type == aiohttp.WSMsgType.TEXT:
        data = json.loads(msg.data)
        if data.get("type") == "omniforcing.stream":
            return data["data"]
    return None


def preview_jpeg(msg):
    """The JPEG of a preview (binary event 1: PREVIEW_IMAGE)."""
    import struct

    import aiohttp

    if msg.type == aiohttp.WSMsgType.BINARY and struct.unpack(">I", msg.data[:4])[0] == 1:
        return bytes(msg.data[8:])
    return None


def test_stream_workflow_with_prompt_schedule_writes_live_files(host):
    from omniforcing_core.live import read_playlist

    g = tinyfy(load_api_workflow("omniforcing_stream_60s_schedule"), seconds=3, window=2)
    (sched,) = nodes_of(g, "OmniForcingPromptSchedule")
    g[sched]["inputs"]["text"] = "0s: a forest at dawn | 1s: rain starts | 2s: thunder"
    events = Websocket(host, stream_event)
    try:
        entry = host.run(g)
    finally:
        time.sleep(0.5)
        events.close()
    assert entry["status"]["status_str"] == "success", error_text(entry)
    (node,) = nodes_of(g, "OmniForcingStream")
    (mp4,) = host.output_files(entry, node)
    live = entry["outputs"][node]["omniforcing_stream"][0]
    playlist = host.output / live["hls_subfolder"] / live["playlist"]
    info = probe(mp4)
    assert info.num_streams == 2 and info.video.frames == 73
    pl = read_playlist(playlist)
    assert pl.ended and pl.seconds == pytest.approx(73 / FPS, abs=1e-3)
    assert probe(playlist).video.frames == 73
    statuses = [e["status"] for e in events.items if e["node"] == node]
    assert statuses[0] == "start" and statuses[-1] == "done" and statuses.count("block") == 3, statuses


def test_native_model_path_shares_weights_and_matches_our_loader(host):
    """UNETLoader (native LTXAV) -> From Native MODEL, run under the student's conventions, gives the same
    latents as our loader on the same weights (ComfyUI's own q/k norms keep their 1e-5 epsilon: ~2e-5
    apart); the stream's exact decode equals decoding the whole latent with ComfyUI's VAE classes."""
    base = tinyfy(load_api_workflow("omniforcing_t2av_5s"), seconds=3)
    keep = {k: v for k, v in base.items() if v["class_type"] in
            ("CheckpointLoaderSimple", "LTXVAudioVAELoader", "OmniForcingTestCLIP", "CLIPTextEncode",
             "OmniForcingModelLoader", "OmniForcingSampler", "LTXVSeparateAVLatent", "VAEDecode",
             "LTXVAudioVAEDecode")}
    (sampler,) = nodes_of(keep, "OmniForcingSampler")
    (vdec,) = nodes_of(keep, "VAEDecode")
    (adec,) = nodes_of(keep, "LTXVAudioVAEDecode")
    (ckpt,) = nodes_of(keep, "CheckpointLoaderSimple")
    (avae,) = nodes_of(keep, "LTXVAudioVAELoader")
    g = dict(keep)
    g["100"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "omniforcing_ltx2_5s_causal.safetensors",
                                                       "weight_dtype": "default"}}
    g["101"] = {"class_type": "OmniForcingFromNativeModel",
                "inputs": {"model": ["100", 0], "layout": "auto", "rope": "auto", "rope_precision": "auto",
                           "av_gate_multiplier": "auto", "conventions": "omniforcing-student"}}
    g["102"] = {"class_type": "OmniForcingSampler", "inputs": {**g[sampler]["inputs"], "model": ["101", 0]}}
    g["110"] = {"class_type": "OmniForcingTestSaveTensors",
                "inputs": {"name": "ours", "latent": [sampler, 0], "image": [vdec, 0], "audio": [adec, 0]}}
    g["111"] = {"class_type": "OmniForcingTestSaveTensors", "inputs": {"name": "native", "latent": ["102", 0]}}
    for mode in ("exact", "balanced", "fast"):
        sid = f"12{len(mode)}"
        g[sid] = {"class_type": "OmniForcingStream", "inputs": {
            **{k: v for k, v in g[sampler]["inputs"].items() if k not in ("vae", "start_image")},
            "vae": [ckpt, 2], "audio_vae": [avae, 0], "filename_prefix": f"omniforcing/cmp_{mode}",
            "decode": mode, "keep_frames": True}}
        g[f"13{len(mode)}"] = {"class_type": "OmniForcingTestSaveTensors",
                               "inputs": {"name": f"stream_{mode}", "image": [sid, 0], "audio": [sid, 1]}}
    entry = host.run(g, timeout=600)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    ours, native = tensors(host, "ours"), tensors(host, "native")
    for k in ("video_latent", "audio_latent"):
        assert ours[k].shape == native[k].shape
        assert (ours[k] - native[k]).abs().max() < 1e-4, k
    report = {}
    for mode in ("exact", "balanced", "fast"):
        s = tensors(host, f"stream_{mode}")
        assert s["image"].shape == ours["image"].shape and s["audio"].shape == ours["audio"].shape
        report[mode] = (float((s["image"] - ours["image"]).abs().max()), float((s["audio"] - ours["audio"]).abs().max()))
    print("streamed vs whole-clip decode (max abs: video [0,1] pixels, audio samples):", report)
    assert report["exact"][0] < 1e-4 and report["exact"][1] < 1e-4


# -- bad inputs ----------------------------------------------------------------------------------------

def t2av(seconds=2, **kw):
    return tinyfy(load_api_workflow("omniforcing_t2av_5s"), seconds=seconds, **kw)


def rejected(host, g) -> str:
    code, r = host.queue(g)
    assert code == 400, f"expected a validation error, got {code}: {r}"
    return json.dumps(r["node_errors"])


def test_missing_file_is_a_node_error(host):
    g = t2av()
    (loader,) = nodes_of(g, "OmniForcingModelLoader")
    g[loader]["inputs"]["generator"] = "omniforcing/not_there.safetensors"
    assert "not_there" in rejected(host, g)


@pytest.mark.parametrize("field,value,needle", [
    ("width", 100, "nearest valid width is 96"),
    ("height", 50, "nearest valid height is 64"),
    ("steps", "1000,abc", "comma-separated"),
    ("steps", "500,900,0", "strictly decreasing"),
])
def test_impossible_settings_are_node_errors(host, field, value, needle):
    g = t2av()
    (sampler,) = nodes_of(g, "OmniForcingSampler")
    g[sampler]["inputs"][field] = value
    assert needle in rejected(host, g)


def test_every_bad_input_is_named_in_one_submission(host):
    g = t2av()
    (sampler,) = nodes_of(g, "OmniForcingSampler")
    g[sampler]["inputs"].update(width=100, height=5000, seconds=0, window=-1, steps="1000,abc")
    code, r = host.queue(g)
    assert code == 400, r
    errors = r["node_errors"][sampler]["errors"]
    by_input: dict = {}
    for e in errors:
        by_input.setdefault(e["extra_info"]["input_name"], []).append(f'{e["message"]} {e["details"]}')
    # seconds and window keep ComfyUI's own range check: once each, under their own name, with the bound
    assert len(by_input["seconds"]) == 1 and "smaller than min of 1" in by_input["seconds"][0]
    assert len(by_input["window"]) == 1 and "smaller than min of 0" in by_input["window"][0]
    text = " ".join(m for msgs in by_input.values() for m in msgs)
    for needle in ("nearest valid width is 96", "nearest valid height is 4096", "comma-separated"):
        assert needle in text, text
    # the inputs that are fine are not blamed
    assert not {"seed", "layout"} & set(by_input), by_input


def test_bad_schedule_text_is_a_node_error(host):
    g = tinyfy(load_api_workflow("omniforcing_stream_60s_schedule"), seconds=2)
    (sched,) = nodes_of(g, "OmniForcingPromptSchedule")
    g[sched]["inputs"]["text"] = "3s: starts late"
    assert "must start at 0s" in rejected(host, g)


def failed(host, g) -> str:
    entry = host.run(g)
    assert entry["status"]["status_str"] == "error"
    return error_text(entry)


def test_wrong_model_type_names_the_fix(host):
    g = t2av()
    (sampler,) = nodes_of(g, "OmniForcingSampler")
    (ckpt,) = nodes_of(g, "CheckpointLoaderSimple")
    g[sampler]["inputs"]["model"] = [ckpt, 0]  # the native LTX-2 MODEL, not converted
    assert "OmniForcing From Native MODEL" in failed(host, g)


def test_wrong_vae_and_unused_prompt_are_clear(host):
    g = tinyfy(load_api_workflow("omniforcing_stream_60s_schedule"), seconds=2)
    (stream,) = nodes_of(g, "OmniForcingStream")
    (avae,) = nodes_of(g, "LTXVAudioVAELoader")
    g[stream]["inputs"]["vae"] = [avae, 0]
    assert "must be the LTX-2 video VAE" in failed(host, g)
    g = tinyfy(load_api_workflow("omniforcing_stream_60s_schedule"), seconds=2)
    (sched,) = nodes_of(g, "OmniForcingPromptSchedule")
    g[sched]["inputs"]["text"] = "0s: one | 5s: two"
    assert "clip ends at 2s" in failed(host, g)


def test_not_a_transformer_file_is_a_clear_error(host):
    g = t2av()
    (loader,) = nodes_of(g, "OmniForcingModelLoader")
    g[loader]["inputs"]["generator"] = "omniforcing/not_a_transformer.safetensors"
    assert "no transformer weights found" in failed(host, g)


# -- cancel --------------------------------------------------------------------------------------------

def test_interrupt_during_a_stream_keeps_a_playable_file_and_the_server_serves(host):
    from omniforcing_core.live import read_playlist

    g = tinyfy(load_api_workflow("omniforcing_stream_60s_schedule"), seconds=30, window=2, decode="fast")
    (sched,) = nodes_of(g, "OmniForcingPromptSchedule")
    g[sched]["inputs"]["text"] = "0s: waves on a beach"
    (stream,) = nodes_of(g, "OmniForcingStream")
    g[stream]["inputs"]["filename_prefix"] = "omniforcing/cancelled"
    code, r = host.queue(g)
    assert code == 200, r
    hls = None
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait until a few segments are on disk
        found = sorted((host.output / "omniforcing").glob("cancelled_*__hls/index.m3u8"))
        if found and len(read_playlist(found[-1]).segments) >= 3:
            hls = found[-1]
            break
        time.sleep(0.2)
    assert hls is not None, f"no segments appeared\n{host.log_tail()}"
    host.post("/interrupt", {})
    entry = host.wait(r["prompt_id"], timeout=120)
    # a cancel keeps its work: the run ends early, is not a failure, and lists the kept MP4 in its outputs
    assert entry["status"]["status_str"] == "success", error_text(entry)
    assert not status_messages(entry, "execution_interrupted")
    out = entry["outputs"][stream]
    mp4 = hls.parent.parent / hls.parent.name.replace("_hls", ".mp4")
    listed = [f for k in ("images", "videos", "gifs") for f in out.get(k, [])]
    assert [(f["filename"], f["subfolder"], f["type"]) for f in listed] == [(mp4.name, "omniforcing", "output")]
    info = probe(mp4)
    (label,) = out["text"]
    kept = float(label.split("kept ")[1].split(" s")[0])
    assert label.startswith("cancelled: kept ") and abs(kept - info.video.frames / 24) < 0.06, label
    assert out["omniforcing_stream"][0]["status"] == "cancelled"
    pl = read_playlist(hls)
    assert pl.ended, "the playlist must be closed after a cancel"
    assert 3 * 24 <= info.video.frames < 1 + 24 * 30 and info.audio is not None
    assert probe(hls).video.frames == info.video.frames
    # the view endpoint serves the kept file the page lists (what the queue panel / Assets open)
    body = host.get(f"/view?filename={mp4.name}&subfolder=omniforcing&type=output")
    assert body[4:8] == b"ftyp"
    # the server keeps serving
    entry = host.run(t2av(seconds=1))
    assert entry["status"]["status_str"] == "success", error_text(entry)


# -- the batch script ------------------------------------------------------------------------------------

def test_queue_batch_script_runs_prompts_and_reports_rejections(host, tmp_path):
    import subprocess
    import sys

    from host import REPO

    wf = tmp_path / "t2av.json"
    wf.write_text(json.dumps(t2av(seconds=1)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog barks\n# skipped\nrain starts\n")
    script = REPO / "scripts" / "queue_batch.py"
    r = subprocess.run([sys.executable, str(script), "--workflow", str(wf), "--prompts", str(prompts),
                        "--server", host.url, "--out", str(tmp_path / "out"), "--seed", "5"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    got = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len(got) == 2 and all(n.endswith(".mp4") for n in got), got
    assert probe(tmp_path / "out" / got[0]).video.frames == 25
    bad = t2av(seconds=1)
    (sampler,) = nodes_of(bad, "OmniForcingSampler")
    bad[sampler]["inputs"]["width"] = 100
    wf.write_text(json.dumps(bad))
    r = subprocess.run([sys.executable, str(script), "--workflow", str(wf), "--prompts", str(prompts),
                        "--server", host.url], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "rejected by the server" in r.stderr and "nearest valid width is 96" in r.stderr


# -- more sampler options ----------------------------------------------------------------------------------

def test_prompt_chain_negative_cfg_prefix_layout_fp8_and_forced_rope(host):
    g = {k: v for k, v in t2av().items() if v["class_type"] in ("OmniForcingTestCLIP", "CLIPTextEncode",
                                                                   "OmniForcingModelLoader", "OmniForcingSampler")}
    (te,) = nodes_of(g, "OmniForcingTestCLIP")
    (pos,) = nodes_of(g, "CLIPTextEncode")
    (loader,) = nodes_of(g, "OmniForcingModelLoader")
    (sampler,) = nodes_of(g, "OmniForcingSampler")
    g["50"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "rain starts", "clip": [te, 0]}}
    g["51"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, silent", "clip": [te, 0]}}
    g["52"] = {"class_type": "OmniForcingPromptAt", "inputs": {"conditioning": [pos, 0], "start_seconds": 0.0,
                                                               "recache": False}}
    g["53"] = {"class_type": "OmniForcingPromptAt", "inputs": {"conditioning": ["50", 0], "start_seconds": 1.0,
                                                               "recache": True, "schedule": ["52", 0]}}
    g[sampler]["inputs"].update(positive=["53", 0], negative=["51", 0], video_cfg=2.0, audio_cfg=3.0, layout="prefix")
    g["54"] = {"class_type": "OmniForcingModelLoader", "inputs": {**g[loader]["inputs"],
                                                                  "weight_dtype": "fp8_e4m3fn", "rope": "split"}}
    g["55"] = {"class_type": "OmniForcingSampler", "inputs": {**g[sampler]["inputs"], "model": ["54", 0],
                                                              "negative": None, "layout": "model"}}
    del g["55"]["inputs"]["negative"]
    g["56"] = {"class_type": "OmniForcingTestSaveTensors", "inputs": {"name": "chain_cfg", "latent": [sampler, 0]}}
    g["57"] = {"class_type": "OmniForcingTestSaveTensors", "inputs": {"name": "fp8_split", "latent": ["55", 0]}}
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    for name in ("chain_cfg", "fp8_split"):
        t = tensors(host, name)
        assert t["video_latent"].shape == (1, 128, 7, 2, 2) and t["audio_latent"].shape == (1, 8, 51, 16)
        assert t["video_latent"].isfinite().all() and t["audio_latent"].isfinite().all()


def test_interrupting_the_offline_sampler_writes_nothing(host):
    g = t2av(seconds=300, window=2)
    (save,) = nodes_of(g, "SaveVideo")
    g[save]["inputs"]["filename_prefix"] = "omniforcing/never_written"
    code, r = host.queue(g)
    assert code == 200, r
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until our sampler is running
        q = host.get("/queue")
        if any(item[1] == r["prompt_id"] for item in q.get("queue_running", [])):
            break
        time.sleep(0.2)
    time.sleep(4)
    host.post("/interrupt", {})
    entry = host.wait(r["prompt_id"], timeout=120)
    assert entry["status"]["status_str"] == "error" and status_messages(entry, "execution_interrupted")
    assert not list((host.output / "omniforcing").glob("never_written*"))
    entry = host.run(t2av(seconds=1))
    assert entry["status"]["status_str"] == "success", error_text(entry)


def test_output_prefix_cannot_escape_the_output_folder(host):
    g = tinyfy(load_api_workflow("omniforcing_i2av"), seconds=1)
    (mux,) = nodes_of(g, "OmniForcingMux")
    g[mux]["inputs"]["filename_prefix"] = "../../escaped/video"
    assert "outside the output folder" in failed(host, g)
    assert not (host.output.parent.parent / "escaped").exists()


# -- the toy's codecs as VAEs (issue 11 item 3) ----------------------------------------------------------

def _toy_core_latents(g: dict, sampler: str, text_node: str):
    """The latents the core library makes for the graph's toy settings (the independent computation)."""
    import torch

    from omniforcing_core.layout import make_clip
    from omniforcing_core.sampling import generate
    from omniforcing_core.toy.default import load_default

    d = load_default()
    s = g[sampler]["inputs"]
    clip = make_clip(d.layout, s["height"], s["width"], seconds=s["seconds"], seed=s["seed"])
    with torch.no_grad():
        v, a = generate(d.model, clip, d.text(g[text_node]["inputs"]["text"]))
    return d, clip, v, a


def _probe_count(host) -> int:
    return host.log_path.read_text(errors="replace").count("decoder reach:")  # stream.py logs every probe


def test_toy_stream_workflow_streams_with_the_toy_codecs_as_vaes(host):
    """The shipped toy stream (no model files): a live MP4 + ended HLS playlist with moving pictures and
    sound; the frames are the toy's own decode of the latents the core makes, the audio what the core's
    streaming decoder gives with the reach and crossfade the toy VAE states (it was not probed)."""
    import numpy as np
    import torch

    from omniforcing_core.decode import StreamingDecoder
    from omniforcing_core.layout import DEFAULT_TIME
    from omniforcing_core.live import read_playlist
    from omniforcing_core.media import decode_audio, decode_video_gray
    from omniforcing_core.streaming import decode_plan

    g = load_api_workflow("omniforcing_toy_stream")
    (stream,) = nodes_of(g, "OmniForcingStream")
    (enc,) = nodes_of(g, "OmniForcingToyTextEncode")
    g["90"] = {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": "toy_stream", "image": [stream, 0], "audio": [stream, 1]}}
    probes = _probe_count(host)
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    assert _probe_count(host) == probes, "the toy VAEs state their reach; nothing should be probed"
    s = g[stream]["inputs"]
    frames = 1 + FPS * s["seconds"]
    (mp4,) = host.output_files(entry, stream)
    info = probe(mp4)
    assert info.num_streams == 2 and (info.video.codec, info.audio.codec) == ("h264", "aac")
    assert info.video.frames == frames and (info.video.width, info.video.height) == (s["width"], s["height"])
    assert info.audio.sample_rate == 24000 and abs(info.av_drift) < 1 / FPS
    assert info.video.duration == pytest.approx(frames / FPS, abs=0.01)
    live = entry["outputs"][stream]["omniforcing_stream"][0]
    playlist = host.output / live["hls_subfolder"] / live["playlist"]
    pl = read_playlist(playlist)
    assert pl.ended and pl.seconds == pytest.approx(frames / FPS, abs=1e-3)
    hls = probe(playlist)
    assert hls.video.frames == frames and hls.audio is not None and abs(hls.av_drift) < 1 / FPS
    # moving pictures and sound, not a constant frame or silence
    luma = decode_video_gray(mp4).astype(np.float32) / 255
    assert luma.shape == (frames, s["height"], s["width"])
    motion = np.abs(np.diff(luma, axis=0)).mean((1, 2))
    assert (motion > 1e-3).mean() > 0.5 and float(luma.std((1, 2)).mean()) > 0.02, motion
    wave = decode_audio(mp4)
    assert float(np.sqrt((wave ** 2).mean())) > 1e-3

    d, clip, v, a = _toy_core_latents(g, stream, enc)
    t = tensors(host, "toy_stream")
    want = d.decode_video(v)[0].permute(1, 2, 3, 0)  # the toy video decoder's reach is 0: exact
    assert t["image"].shape == want.shape and float((t["image"] - want).abs().max()) < 1e-3
    plan = decode_plan(s["decode"], d.decoders(DEFAULT_TIME), DEFAULT_TIME)
    audio = StreamingDecoder(plan.decoders.audio)
    parts = [audio.push(a[:, :, b.audio_start:b.audio_end]) for b in clip.blocks()] + [audio.flush()]
    want_audio = torch.cat([p.data for p in parts if p is not None], -1)
    assert t["audio"].shape == want_audio.shape and float(t["sample_rate"][0]) == 24000
    # 1e-3 as for the frames: the core's plain Linear layers run the feed-forward as one fused matmul+GELU,
    # ComfyUI's casting layers do not, so the latents agree to float32 rounding, not bit for bit
    assert float((t["audio"] - want_audio).abs().max()) < 1e-3


def test_toy_vaes_work_in_comfyuis_own_vae_nodes(host):
    """VAE Decode and LTXV Audio VAE Decode take the toy's VAEs and give what the toy's own decode node
    gives; VAE Encode of those frames gives latents that decode back to the same picture; LTXV Audio VAE
    Encode gives what the core's toy encoder gives for the sound at the codec's 16 kHz."""
    import torch
    import torchaudio

    from omniforcing_core.toy.default import load_text_and_codecs
    from omniforcing_core.toy.encode import encode_audio

    g = load_api_workflow("omniforcing_toy_demo")
    g = {k: v for k, v in g.items() if v["class_type"] not in ("CreateVideo", "SaveVideo")}
    (toy,) = nodes_of(g, "OmniForcingToyModel")
    (sampler,) = nodes_of(g, "OmniForcingSampler")
    (dec,) = nodes_of(g, "OmniForcingToyDecode")
    g[sampler]["inputs"]["seconds"] = 2
    g["91"] = {"class_type": "LTXVSeparateAVLatent", "inputs": {"av_latent": [sampler, 0]}}
    g["92"] = {"class_type": "VAEDecode", "inputs": {"samples": ["91", 0], "vae": [toy, 3]}}
    g["93"] = {"class_type": "LTXVAudioVAEDecode", "inputs": {"samples": ["91", 1], "audio_vae": [toy, 4]}}
    g["94"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["92", 0], "vae": [toy, 3]}}
    g["95"] = {"class_type": "VAEDecode", "inputs": {"samples": ["94", 0], "vae": [toy, 3]}}
    g["96"] = {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": "toy_ref", "image": [dec, 0], "audio": [dec, 1], "latent": [sampler, 0]}}
    g["97"] = {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": "toy_native", "image": ["92", 0], "audio": ["93", 0]}}
    g["98"] = {"class_type": "OmniForcingTestSaveTensors",
               "inputs": {"name": "toy_reencoded", "image": ["95", 0], "latent": ["94", 0]}}
    g["99"] = {"class_type": "LTXVAudioVAEEncode", "inputs": {"audio": [dec, 1], "audio_vae": [toy, 4]}}
    g["100"] = {"class_type": "OmniForcingTestSaveTensors", "inputs": {"name": "toy_audio_enc", "latent": ["99", 0]}}
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    ref, native, again = tensors(host, "toy_ref"), tensors(host, "toy_native"), tensors(host, "toy_reencoded")
    assert native["image"].shape == ref["image"].shape == (49, 128, 128, 3)
    assert float((native["image"] - ref["image"]).abs().max()) < 1e-6
    assert native["audio"].shape == ref["audio"].shape and float(native["sample_rate"][0]) == 24000
    assert float((native["audio"] - ref["audio"]).abs().max()) < 1e-6
    assert again["latent"].shape == ref["video_latent"].shape
    err = float(((again["image"] - ref["image"]) ** 2).mean())
    spread = float(((ref["image"] - ref["image"].mean((0, 1, 2))) ** 2).mean())
    print(f"VAE Encode -> Decode of toy frames: mse {err:.2e} (frames' own variance {spread:.2e})")
    assert err < 0.15 * spread  # 4x pooling then bilinear upsampling blurs edges a little
    wave = torchaudio.functional.resample(ref["audio"], 24000, 16000).mean(1)  # what the node is handed
    want = encode_audio(load_text_and_codecs()[1], wave[:, :wave.shape[-1] // 640 * 640])
    got = tensors(host, "toy_audio_enc")["latent"]
    assert got.shape == want.shape == (1, 8, ref["audio_latent"].shape[2], 16)
    assert float((got - want).abs().max()) < 1e-4


def test_toy_stream_from_a_start_image_encoded_by_the_toy_vae(host):
    """start_image with the toy VAE: the first frame is the toy decode of the latent fitted to the image
    (computed here by the core), and it looks like the image."""
    import numpy as np
    import torch
    from PIL import Image

    from omniforcing_core.toy import world
    from omniforcing_core.toy.default import load_text_and_codecs

    picture = world.make_clip(11, seconds=1.0).video[:, 0].permute(1, 2, 0)  # [128, 128, 3], a world frame
    png = (picture.numpy() * 255).round().astype(np.uint8)
    Image.fromarray(png).save(host.base / "input" / "toy_start.png")
    g = load_api_workflow("omniforcing_toy_stream")
    (stream,) = nodes_of(g, "OmniForcingStream")
    g["80"] = {"class_type": "LoadImage", "inputs": {"image": "toy_start.png"}}
    g[stream]["inputs"].update(seconds=2, start_image=["80", 0], filename_prefix="omniforcing/toy_i2av")
    g["90"] = {"class_type": "OmniForcingTestSaveTensors", "inputs": {"name": "toy_i2av", "image": [stream, 0]}}
    entry = host.run(g)
    assert entry["status"]["status_str"] == "success", error_text(entry)
    first = tensors(host, "toy_i2av")["image"][0]
    target = torch.from_numpy(png).float() / 255
    codec = load_text_and_codecs()[1].video
    want = codec.decode(codec.encode(target.permute(2, 0, 1)[None, :, None]))[0, :, 0].permute(1, 2, 0)
    assert float((first - want).abs().max()) < 1e-3
    bg = target[:2, :2].mean((0, 1))
    objects = (target - bg).abs().sum(-1) > 0.3
    assert objects.any()
    err, dev = (first - target).abs().sum(-1)[objects].mean(), (target - bg).abs().sum(-1)[objects].mean()
    assert float(err) < 0.4 * float(dev)


def test_sampler_previews_of_toy_latents_are_the_toy_decode(host):
    """The offline sampler's per-block preview of a toy MODEL is its codec's decode of the block's last
    frame, not LTX-2's latent2rgb (which makes grey blur of toy latents)."""
    import io as _io

    import numpy as np
    from PIL import Image

    g = load_api_workflow("omniforcing_toy_demo")
    g = {k: v for k, v in g.items() if v["class_type"] not in ("CreateVideo", "SaveVideo")}
    (sampler,) = nodes_of(g, "OmniForcingSampler")
    (dec,) = nodes_of(g, "OmniForcingToyDecode")
    g[sampler]["inputs"].update(seconds=2, seed=5)
    g["90"] = {"class_type": "OmniForcingTestSaveTensors", "inputs": {"name": "toy_preview", "image": [dec, 0]}}
    previews = Websocket(host, preview_jpeg)
    try:
        entry = host.run(g)
    finally:
        time.sleep(0.5)
        previews.close()
    assert entry["status"]["status_str"] == "success", error_text(entry)
    assert len(previews.items) >= 2, f"{len(previews.items)} previews"  # one per block
    frame = tensors(host, "toy_preview")["image"][-1].numpy()  # the clip's last frame
    shown = Image.open(_io.BytesIO(previews.items[-1])).convert("RGB")
    shown = np.asarray(shown.resize(frame.shape[1::-1], Image.BILINEAR), np.float32) / 255
    err = float(np.abs(shown - frame).mean())
    flat = float(np.abs(frame.mean((0, 1)) - frame).mean())  # what a structureless preview would score
    assert err < 0.03 and err < 0.5 * flat, (err, flat)
