"""Issue 14's command-line catalogue: every bad argument is one clear message and a non-zero exit,
never a silent default and never a raw traceback (in process: the CLI's own `main`)."""
import pytest

from omniforcing_core.cli import main


@pytest.mark.parametrize("argv,needle", [
    (["demo", "--seconds", "nan"], "not a length"),
    (["demo", "--seconds", "inf"], "not a length"),
    (["demo", "--seconds", "abc"], "not a number of seconds"),
    (["keys", "--sinks", "-5"], "0 or more"),
    (["demo", "--hls-window", "-1"], "0 or more"),
])
def test_argument_errors_exit_2_with_the_fix(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and "Traceback" not in err


@pytest.mark.parametrize("extra,needle", [
    (["--seconds", "1e-7"], "whole seconds (at least 1); nearest valid is 1"),
    (["--seconds", "2.5"], "nearest valid is 2"),
    (["--height", "0"], "height=0 is not a positive multiple of 32; nearest valid height is 32"),
    (["--width", "100", "--height", "130"], "nearest valid width is 96; height=130"),
    (["--window", "-1"], "window=-1"),
    (["--assets", "/nonexistent/toy"], "no exported toy assets there"),
])
def test_demo_refuses_bad_values_before_writing(extra, needle, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (out / "omniforcing.mp4").exists()  # nothing was written


def test_demo_still_runs_after_the_checks(tmp_path, capsys):
    """Negative control: a valid call streams (3 s, random model: fast); a rolling playlist keeps 2 segments."""
    from omniforcing_core.live import read_playlist
    assert main(["demo", "--random", "--seconds", "3", "--hls-window", "2", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "omniforcing.mp4").stat().st_size > 0
    assert len(read_playlist(tmp_path / "hls" / "index.m3u8").segments) == 2


def test_a_stream_that_cannot_fit_is_one_message_and_nothing_is_written(tmp_path, capsys, monkeypatch):
    """The memory pre-flight (and a NaN block) end the command with one line, exit 1, no traceback."""
    from omniforcing_core import budget
    monkeypatch.setattr(budget, "available_bytes", lambda device: budget.HEADROOM)
    out = tmp_path / "out"
    assert main(["demo", "--random", "--seconds", "3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "rolling window" in err and "Traceback" not in err
    assert not out.exists() or not any(out.rglob("*"))  # the output folder was never touched
