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


def test_a_read_only_or_full_disk_says_to_write_elsewhere(tmp_path, monkeypatch, capsys):
    """A run folder made on a read-only mount was a traceback (EROFS is neither a permission nor the
    data's fault); a file written there said only "cannot write (Read-only file system)"."""
    import errno

    import pytest

    from sicot_cli import fsutil
    from sicot_cli.console import guard
    from sicot_cli.errors import SicotError

    @guard
    def make_run_dir() -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/runs/x")

    with pytest.raises(SystemExit) as e:
        make_run_dir()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert "/mnt/ro/runs/x: cannot write (Read-only file system); the filesystem is read-only" in " ".join(err.split())

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(fsutil.os, "replace", read_only)
    with pytest.raises(
        SicotError, match=r"cannot write \(Read-only file system\); the filesystem is read-only.*--run-dir"
    ):
        with fsutil.atomic_path(tmp_path / "o.json") as tmp:
            tmp.write_text("{}")
    assert not list(tmp_path.iterdir()), "no temporary left behind"


def test_an_ignored_sigterm_stays_ignored():
    """`trap '' TERM; exec sicot train ...` asks for a job that outlives SIGTERM: sicot made it stop."""
    import signal

    from sicot_cli.console import stop_on_sigterm
    from sicot_cli.interrupts import interrupt

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        stop_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop_on_sigterm()
        assert signal.getsignal(signal.SIGTERM) is interrupt
    finally:
        signal.signal(signal.SIGTERM, before)


def test_a_local_encoders_module_does_not_hide_sicots(tmp_path):
    """`python -m sicot_cli` (and torchrun -m) from a folder with the user's own encoders.py, or a
    folder of encoder files named encoders/: the first command that needed the registry was an
    ImportError traceback (the folder hid it with an editable install)."""
    (tmp_path / "encoders.py").write_text("x = 1\n")
    # registered ahead of the local file, but run on first use: `--help` imports no torch
    code = "import sys; from sicot_cli.cli import _check_encoders_package as c; c(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    r = _sicot(["ablate", "--encoder-module", "encoders"], tmp_path, COLUMNS="300")
    assert r.returncode == 2 and "give its path (./encoders.py)" in r.stderr.decode(), r.stderr.decode()
    for case in ("file", "folder"):
        r = _sicot(["ablate", "--encoders", "nope"], tmp_path, COLUMNS="300")
        err = r.stderr.decode()
        assert r.returncode == 2 and "Traceback" not in err, (case, err)
        assert "unknown encoder 'nope'" in err and "bilinear" in err, (case, err)
        (tmp_path / "encoders.py").unlink(missing_ok=True)
        (tmp_path / "encoders").mkdir(exist_ok=True)
        (tmp_path / "encoders" / "mine.py").write_text("x = 1\n")
    r = _sicot(["ablate", "--encoder-module", "encoders.mine"], tmp_path, COLUMNS="300")
    assert r.returncode == 2 and "give its path (./encoders/mine.py)" in r.stderr.decode(), r.stderr.decode()


def test_worker_processes_without_a_writable_dev_shm_are_one_line(monkeypatch):
    """A read-only or full /dev/shm (a container's) failed prepare as "data.out: cannot write
    (Read-only file system); write to a folder on a writable one": the output's disk was fine."""
    import errno
    import multiprocessing

    import pytest

    from sicot_cli.errors import SicotError
    from sicot_cli.threads import worker_pool

    def no_shm(*_a, **_k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(multiprocessing, "Event", no_shm)
    with pytest.raises(
        SicotError, match=r"cannot start [0-9]+ worker processes \(Read-only file system\).*/dev/shm.*--workers 1"
    ):
        with worker_pool(2):
            pass


def test_the_epoch_table_keeps_its_numbers_whole_in_an_80_column_terminal():
    """In a terminal of 80 columns the epoch table split "53.61" into "53." and "61" (every column
    folded to fit): without the cells' padding it fits, numbers whole."""
    import io

    from rich.console import Console

    from sicot_cli.console import show
    from sicot_cli.views import epochs_table

    rec = dict(
        epoch=12, lr=0.03, loss=1.2345, loss_v=0.9876, loss_m=0.5432, lam=1, train_images_per_s=1234,
        val_top1=53.61, val_top3=84.38, val_head_top1=87.5, val_tail_top1=51.19,
    )  # fmt: skip
    out = io.StringIO()
    show(epochs_table([rec], "run"), Console(file=out, width=80, force_terminal=True, color_system=None))
    text = out.getvalue()
    assert max(map(len, text.splitlines())) <= 80, text
    for number in ("3.00e-02", "1.234", "0.988", "0.543", "1234", "53.61", "84.38", "87.50", "51.19"):
        assert number in text, (number, text)


def test_columns_zero_in_the_environment_is_ignored(monkeypatch):
    """COLUMNS=0 made every line of a terminal zero characters wide: sicot printed nothing."""
    from sicot_cli.console import _sane_terminal_size

    for bad in ("0", "-3", "abc", "", "٣"):
        monkeypatch.setenv("COLUMNS", bad)
        monkeypatch.setenv("LINES", "0")
        _sane_terminal_size()
        assert "COLUMNS" not in os.environ and "LINES" not in os.environ, bad
    monkeypatch.setenv("COLUMNS", "120")
    _sane_terminal_size()
    assert os.environ["COLUMNS"] == "120"
