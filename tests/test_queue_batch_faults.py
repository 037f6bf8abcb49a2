"""scripts/queue_batch.py against a hostile or failing server and bad arguments: files stay inside --out,
every failure is one clear message (no traceback), transient failures are retried, Ctrl-C keeps the summary."""
import signal
import subprocess
import sys
import threading

import pytest

# the stub ComfyUI and helpers live with the main tests (tests/ is on sys.path under pytest)
from test_queue_batch import FAST, SCRIPT, TOY, batch, prompts_file, queue_batch, stub  # noqa: F401


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- the server writes only inside --out ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    {"filename": "../../evil.txt"}, {"filename": "/etc/x"}, {"filename": "a/../../b"}, {"filename": ".."},
    {"filename": ""}, {"filename": "x\0y.mp4"}, {"filename": "C:\\evil.txt"}, {"filename": "..\\..\\evil.txt"},
    {"filename": "sub/evil.txt"}, {"filename": "esc\x1b[2J.mp4"}, {"filename": 7},
    {"filename": "x.mp4", "subfolder": "../../etc"}, {"filename": "x.mp4", "subfolder": "/etc"},
    {"filename": "x.mp4", "type": "../output"},
], ids=repr)
def test_hostile_file_names_never_write_outside_out(stub, tmp_path, capsys, bad):
    stub.outputs = lambda n: [bad, {"filename": "fine.mp4", "subfolder": "", "type": "output"}]
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    out = work / "out"
    assert batch(stub, work, "--out", out, prompts=["one"]) == 1
    assert files_under(tmp_path) == ["a", "a/b", "a/b/out", "a/b/out/001_fine.mp4", "a/b/p.txt"]
    assert [v["filename"] for v in stub.views] == ["fine.mp4"]  # the bad one is not even asked for
    text, err = capsys.readouterr()
    assert "unsafe" in err and "\x1b" not in text + err
    assert "Summary: 1 job(s): 1 failed" in text


def test_a_symlink_already_in_out_is_replaced_not_followed(stub, tmp_path):
    out, precious = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    precious.write_text("keep me")
    (out / "001_toy_00001_.mp4").symlink_to(precious)
    assert batch(stub, tmp_path, "--out", out, prompts=["one"]) == 0
    assert precious.read_text() == "keep me"
    dest = out / "001_toy_00001_.mp4"
    assert not dest.is_symlink() and dest.read_bytes() == b"bytes of toy_00001_.mp4"
    assert files_under(out) == ["001_toy_00001_.mp4"]  # no temporary file left behind


def test_an_out_that_is_a_symlinked_folder_is_used_as_given(stub, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert batch(stub, tmp_path, "--out", tmp_path / "link", prompts=["one"]) == 0
    assert files_under(real) == ["001_toy_00001_.mp4"]


def test_two_outputs_with_one_name_do_not_overwrite_each_other(stub, tmp_path):
    stub.outputs = lambda n: [{"filename": "a.mp4", "subfolder": "x"}, {"filename": "a.mp4", "subfolder": "y"}]
    assert batch(stub, tmp_path, "--out", tmp_path / "out", prompts=["one"]) == 0
    assert files_under(tmp_path / "out") == ["001_a.mp4", "001_a_2.mp4"]


def test_server_text_cannot_reach_the_terminal_raw():
    assert queue_batch.clean("a\x1b[2Jb\n") == "a\\x1b[2Jb\\n"
    assert len(queue_batch.clean("x" * 1000, 50)) == 50


# -- bad arguments: exit 2 before anything is queued ----------------------------------------------------------------

@pytest.mark.parametrize("url", ["notaurl", "http://[::1", "http://127.0.0.1:99999", "ftp://127.0.0.1",
                                 "http://", "http://a b", "localhost:8188"])
def test_bad_server_addresses_are_refused(tmp_path, capsys, url):
    assert queue_batch.main(["--workflow", str(TOY), "--prompts", str(prompts_file(tmp_path, "x")),
                             "--server", url]) == 2
    err = capsys.readouterr().err
    assert "is not an address like http://127.0.0.1:8188" in err
    assert ("did you mean http://localhost:8188" in err) == (url == "localhost:8188")


def test_a_prompt_file_that_is_not_utf8_is_refused(stub, tmp_path, capsys):
    p = tmp_path / "latin1.txt"
    p.write_bytes("café au lait\n".encode("latin-1"))
    assert queue_batch.main(["--workflow", str(TOY), "--prompts", str(p), "--server", stub.url]) == 2
    assert "is not UTF-8 text (byte 0xe9 at offset 3)" in capsys.readouterr().err and not stub.posts


def test_a_bom_is_not_part_of_the_first_prompt(stub, tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes("\ufeffa red ball\n".encode("utf-8"))
    assert queue_batch.main(["--workflow", str(TOY), "--prompts", str(p), "--server", stub.url, *FAST]) == 0
    assert stub.posts[0]["2"]["inputs"]["text"] == "a red ball"


def test_out_being_a_file_is_refused(stub, tmp_path, capsys):
    f = tmp_path / "out"
    f.write_text("not a folder")
    assert batch(stub, tmp_path, "--out", f) == 2
    assert f"error: --out {f} exists and is not a folder" in capsys.readouterr().err
    assert not stub.posts and f.read_text() == "not a folder"


@pytest.mark.parametrize("fault,code", [("html", 2), (500, 2), ("drop", 2)])
def test_a_server_that_is_not_comfyui_at_the_start(stub, tmp_path, capsys, fault, code):
    stub.faults = [("/system_stats", fault)] * 5
    assert batch(stub, tmp_path, "--retries", 2) == code
    err = capsys.readouterr().err
    assert {"html": "instead of JSON", 500: "HTTP 500 from /system_stats", "drop": "cannot reach ComfyUI"}[fault] in err
    assert not stub.posts


# -- transient failures are retried, lasting ones fail the job -----------------------------------------------------

@pytest.mark.parametrize("fault", [("/history", 500), ("/history", 503), ("/history", "drop"), ("/history", 0.5),
                                   ("/prompt", 500), ("/view", 502), ("/view", "drop"), ("/system_stats", 500)],
                         ids=repr)
def test_a_transient_failure_is_retried(stub, tmp_path, fault):
    stub.faults = [fault]
    assert batch(stub, tmp_path, "--out", tmp_path / "out", "--http-timeout", "0.2") == 0
    assert len(stub.posts) == 3 and not stub.faults
    assert len(list((tmp_path / "out").iterdir())) == 3


def test_a_lasting_server_error_fails_that_job_only(stub, tmp_path, capsys):
    stub.faults = [("/history", 500)] * 3
    assert batch(stub, tmp_path, "--retries", 2) == 1
    out, err = capsys.readouterr()
    assert "Summary: 3 job(s): 2 done, 1 failed" in out and "HTTP 500 from /history/" in out
    assert "Traceback" not in err


def test_html_instead_of_json_fails_that_job(stub, tmp_path, capsys):
    stub.faults = [("/history", "html")]
    assert batch(stub, tmp_path) == 1
    out = capsys.readouterr().out
    assert "#1   failed" in out and "text/html instead of JSON ('<html><body>502 Bad Gateway" in out


def test_a_dropped_submission_is_not_sent_twice(stub, tmp_path, capsys):
    stub.faults = [("/prompt", "drop")]
    assert batch(stub, tmp_path) == 1
    out, err = capsys.readouterr()
    assert not stub.posts and "may or may not have been queued" in err
    assert "Summary: 3 job(s): 1 failed, 2 skipped" in out


def test_a_server_that_goes_down_mid_run_ends_the_batch(stub, tmp_path, capsys):
    stub.never_finish = {1}
    stub.on_history = lambda s: setattr(s, "down", True)
    assert batch(stub, tmp_path, "--parallel", 2, "--retries", 2) == 1
    out, err = capsys.readouterr()
    assert "cannot reach ComfyUI" in err and len(stub.posts) == 2
    assert "Summary: 3 job(s): 2 failed, 1 skipped" in out and "lost contact with the server" in out


def test_ctrl_c_prints_the_summary_so_far_and_exits_130(stub, tmp_path):
    stub.never_finish = {2}
    cmd = [sys.executable, str(SCRIPT), "--workflow", str(TOY), "--server", stub.url, *FAST,
           "--prompts", str(prompts_file(tmp_path, "first", "second", "third"))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(20, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:  # wait until job 2 is queued (and stays so)
            if line.startswith("[2/3]") and "queued as" in line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        watchdog.cancel()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "1 queued job(s) keep running on the server" in err
    assert "Summary: 3 job(s): 1 done, 1 queued, 1 waiting" in out
    assert "still on the server as" in out and "'third': not queued" in out


def test_no_traceback_from_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--workflow", str(TOY), "--server", "http://[::1",
                        "--prompts", str(prompts_file(tmp_path, "x"))], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: --server")
