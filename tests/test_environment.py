"""The machine around sicot: the locale, the terminal, signals, the git checkout it runs from."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sicot_cli import runs

ROOT = Path(__file__).resolve().parents[1]


def _sicot(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sicot_cli", *args],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "100", **env},
        capture_output=True,
        timeout=300,
    )


def test_a_stdout_that_is_not_utf8_shows_escapes_not_a_traceback(tmp_path):
    """`PYTHONIOENCODING=ascii` (or a C locale without UTF-8 mode): the ± of the help, the λ of the
    training table and Chinese titles were a UnicodeEncodeError traceback, after the work was done."""
    r = _sicot(["--help"], tmp_path, PYTHONIOENCODING="ascii")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode()
    r = _sicot(["tokenize", "红色 T恤 for men"], tmp_path, PYTHONIOENCODING="ascii")
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode()
    assert b"\\u7ea2" in r.stdout and b"men" in r.stdout, r.stdout


def test_a_locale_that_is_not_utf8_is_named_as_the_cause_of_a_refused_name(tmp_path):
    """Valid UTF-8 in a C locale (Python reads the bytes as ASCII): "not valid UTF-8; rename it" was wrong."""
    env = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    r = _sicot(["prepare", "--out", str(tmp_path / "中文.h5")], tmp_path, **env)
    text = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and "this shell's locale is not UTF-8" in text and "LANG=C.UTF-8" in text, text
    assert not (tmp_path / "中文.h5").exists()


def test_the_git_commit_is_sicots_own_or_none(tmp_path, monkeypatch):
    """An installed sicot inside another project's repository recorded that project's commit."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode == 0:
        assert runs.git_commit() == head.stdout.strip()
    other = tmp_path / "project"
    (other / ".venv" / "lib" / "sicot_cli").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    subprocess.run(
        [
            "git",
            "-C",
            str(other),
            "-c",
            "user.email=a@b",
            "-c",
            "user.name=a",
            "commit",
            "-q",
            "--allow-empty",
            "-m",
            "x",
        ],
        check=True,
    )
    monkeypatch.setattr(runs, "__file__", str(other / ".venv" / "lib" / "sicot_cli" / "runs.py"))
    assert runs.git_commit() is None
    (other / "sicot_cli").mkdir()  # sicot's own checkout: the package's parent is the top level
    monkeypatch.setattr(runs, "__file__", str(other / "sicot_cli" / "runs.py"))
    assert runs.git_commit() is not None and len(runs.git_commit()) == 40


def test_off_a_terminal_a_long_stage_says_it_is_still_running(monkeypatch, caplog):
    """A log file showed nothing for minutes while a vocabulary or an evaluation was built: off a
    terminal each stage writes a line every HEARTBEAT_S seconds, a stage done sooner says nothing."""
    import logging
    import time

    from sicot_cli import console

    monkeypatch.setattr(console, "HEARTBEAT_S", 0.05)
    monkeypatch.setattr(console.err_console, "_force_terminal", False)  # no bar drawn, also under `pytest -s`
    caplog.set_level(logging.INFO, logger="sicot_cli.console")
    with console.RichProgress().task("building the vocabulary", None):
        time.sleep(0.3)
    with console.RichProgress().task("scoring test images", 10) as t:
        for _ in range(10):
            time.sleep(0.03)
            t.advance()
    time.sleep(0.2)  # a closed stage's thread says nothing more
    lines = [r.getMessage() for r in caplog.records]
    stage = [ln for ln in lines if ln.startswith("building the vocabulary ... (")]
    counted = [ln for ln in lines if ln.startswith("scoring test images: ") and "/10 (" in ln]
    assert 2 <= len(stage) <= 7 and counted, lines
    monkeypatch.setattr(console, "HEARTBEAT_S", 60.0)
    caplog.clear()
    with console.RichProgress().task("reading the rows", None):
        pass
    assert not caplog.records, "a short stage says nothing off a terminal"


def test_a_desktop_or_wrong_mplbackend_does_not_break_the_figures(tmp_path):
    """MPLBACKEND=nonsense (or a Qt backend on a headless box) was a ValueError traceback inside
    matplotlib's import when `sicot report` drew its figures."""
    code = "from sicot_cli.figures import _plt; plt = _plt(); print(plt.get_backend())"
    for backend in ("nonsense", "qtagg"):
        r = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "MPLBACKEND": backend}, capture_output=True
        )
        assert r.returncode == 0 and r.stdout.decode().strip().lower() == "agg", r.stderr.decode()
