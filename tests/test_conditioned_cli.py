"""`demo --audio FILE` (A->V) and `demo --video FILE` (V->A) on the embedded toy, run in process through
the command line's own `main`; the output files are decoded back and held against the input."""
import json
import subprocess

import numpy as np
import pytest

from omniforcing_core.cli import main
from omniforcing_core.layout import DEFAULT_TIME
from omniforcing_core.media import decode_audio, decode_video_gray, ffmpeg_exe, probe_media, write_mp4
from omniforcing_core.toy import default, world
from omniforcing_core.usermedia import read_audio

pytestmark = pytest.mark.skipif(not default.has_trained_assets(), reason="the toy assets are not shipped here")

PROMPT = "a red ball bounces twice"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 2 s world clip as an MP3 (44.1 kHz stereo: the demo resamples) and as a 24 fps MP4 without audio."""
    d = tmp_path_factory.mktemp("given")
    clip = world.make_clip(7_000_005, seconds=2.0)
    mp3 = d / "in.mp3"
    subprocess.run([ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "f32le", "-ar", str(world.SAMPLE_RATE), "-ac", "1",
                    "-i", "pipe:0", "-ar", "44100", "-ac", "2", "-c:a", "libmp3lame", "-b:a", "192k", str(mp3)],
                   input=clip.audio.numpy().astype(np.float32).tobytes(), check=True)
    mp4 = d / "in.mp4"
    write_mp4(mp4, clip.video.permute(1, 2, 3, 0).numpy(), world.FPS, None)
    return mp3, mp4


def demo(tmp_path, name, *args, capsys=None):
    out = tmp_path / name
    code = main(["demo", "--prompt", PROMPT, "--seed", "4", "--out", str(out), *args])
    report = None
    if capsys is not None:
        text = capsys.readouterr()
        lines = [ln for ln in text.out.splitlines() if ln.startswith("{")]
        report = json.loads(lines[-1]) if lines else text.err
    return code, out / "omniforcing.mp4", report


def rel_rms(a: np.ndarray, b: np.ndarray) -> float:
    n = min(a.shape[-1], b.shape[-1])
    return float(np.sqrt(np.mean((a[..., :n] - b[..., :n]) ** 2)) / np.sqrt(np.mean(a[..., :n] ** 2)))


def test_audio_drives_the_video_and_the_output_carries_that_audio(files, tmp_path, capsys):
    mp3, _ = files
    code, out, rep = demo(tmp_path, "a2v", "--audio", str(mp3), capsys=capsys)
    assert code == 0 and rep["given"] == "audio" and rep["blocks"] == 2  # the file's 2 whole seconds
    info = probe_media(out)
    assert abs(info.av_drift) < 1024 / 24000 and info.audio.sample_rate == 24000
    want = read_audio(mp3, DEFAULT_TIME).numpy()  # the input as the stream's clock reads it
    got = decode_audio(out, 24000, 2)
    assert got.shape[-1] >= want.shape[-1]
    err = rel_rms(want, got)
    assert err < 0.05, err  # AAC round trip of the very samples, not a decode of their latents
    # negative control: the same stream without --audio carries the decode of generated audio
    code, plain, _ = demo(tmp_path, "plain", "--seconds", "2", capsys=capsys)
    assert code == 0 and rel_rms(want, decode_audio(plain, 24000, 2)) > 0.5
    # and the video was generated to the given audio: not the unconditioned stream's video
    gv, pv = decode_video_gray(out).astype(float), decode_video_gray(plain).astype(float)
    assert gv.shape == pv.shape and np.abs(gv - pv).mean() > 1.0


def test_video_drives_the_audio_and_the_output_carries_those_frames(files, tmp_path, capsys):
    _, mp4 = files
    code, out, rep = demo(tmp_path, "v2a", "--video", str(mp4), capsys=capsys)
    assert code == 0 and rep["given"] == "video" and rep["blocks"] == 2
    want = decode_video_gray(mp4).astype(float)  # 49 frames
    got = decode_video_gray(out).astype(float)
    assert got.shape == want.shape
    err = np.abs(got - want).mean()
    assert err < 3.0, err  # two H.264 encodes of the same frames
    code, plain, _ = demo(tmp_path, "plain", "--seconds", "2", capsys=capsys)
    assert np.abs(decode_video_gray(plain).astype(float) - want).mean() > 4 * max(err, 1.0)  # negative control
    assert probe_media(out).audio.duration > 1.9  # the audio is generated for the whole stream


def test_input_shorter_than_asked_and_other_misuse_are_one_line_errors(files, tmp_path, capsys):
    mp3, mp4 = files
    for args, needle in ((["--audio", str(mp3), "--seconds", "3"], "shorter than the 3 s asked: ask for at most 2 s"),
                         (["--video", str(mp4), "--seconds", "4"], "shorter than the 4 s asked: ask for at most 2 s"),
                         (["--audio", str(mp4)], "no audio in it"),
                         (["--video", str(mp3)], "no video in it"),
                         (["--audio", str(tmp_path / "none.wav")], "no such file"),
                         (["--audio", str(mp3), "--random"], "leave out --random")):
        code, out, err = demo(tmp_path, "bad", *args, capsys=capsys)
        assert code == 2, (args, err)
        assert needle in err and err.startswith("error: ") and err.count("\n") == 1, err
        assert not out.exists()  # nothing written


def test_conditioned_report_matches_each_generated_modality_against_the_true_other_one():
    from omniforcing_core.toy.report import format_conditioned_table, run_conditioned_report
    rows = {r["model"].split(":")[0]: r for r in run_conditioned_report(n=2, log=lambda *_: None)}
    gt = rows["ground-truth clip (detector check)"]
    assert gt["event_recall"] >= 0.9
    # A->V rows look up the true audio's onsets, V->A rows the true video's visual events: the counts
    # that come from true media equal the ground-truth row's, the generated side's do not have to
    for k in ("A->V", "A->V control"):
        assert rows[k]["onsets"] == gt["onsets"]
    for k in ("V->A", "V->A control"):
        assert rows[k]["visual_events"] == gt["visual_events"]
    assert rows["A->V"]["s_per_clip"] > 0 and "onset recall" in format_conditioned_table(list(rows.values()))
