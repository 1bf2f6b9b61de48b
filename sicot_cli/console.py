"""Everything rich: the consoles, progress bars, logging handler and the error line.

Library modules never import this; the CLI does.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from sicot_cli.errors import WHERE_ELSE, SicotError
from sicot_cli.interrupts import interrupt, stop_code

log = logging.getLogger(__name__)


def _sane_terminal_size() -> None:
    """``COLUMNS=0`` (or ``LINES=0``, or a non-number) in the environment made rich draw every line
    zero characters wide: a command printed nothing at all in a terminal. Such a value is dropped
    and the terminal's own size is used."""
    for name in ("COLUMNS", "LINES"):
        value = os.environ.get(name)
        if value is not None and not (value.strip().isascii() and value.strip().isdigit() and int(value) > 0):
            del os.environ[name]


_sane_terminal_size()
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

# What must never reach a terminal from data or the filesystem: C0 controls (ESC starts CSI/OSC
# sequences: OSC 0 sets the window title, OSC 52 writes the clipboard, CSI 2J clears the screen),
# DEL, C1 controls (U+009B is a one-character CSI) and the bidi embeddings, overrides and isolates
# that make a line display as something other than what it holds. Tab and newline are kept only
# where the output is plain text (``plain``), never inside a table cell or an error line.
# Lone surrogates too: the bytes of a file name that are not UTF-8 (Python's surrogateescape),
# which would otherwise be written raw and make the output invalid UTF-8 (and invalid JSON).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")
_UNSAFE_PLAIN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\ud800-\udfff]")


def _visible(m: re.Match[str]) -> str:
    return f"\\u{ord(m.group()):04x}"


def clean(value: object) -> str:
    """``value`` as one line of text: every control character shown as a ``\\u`` escape with four hex digits, never sent raw."""
    return _UNSAFE.sub(_visible, str(value))


def safe(value: object, style: str = "") -> Text:
    """Text from data or the filesystem, for rich: control characters made visible, never parsed as markup.

    Everything printed through rich that did not come from sicot's own code (labels, titles, image
    and run paths, encoder names, skip examples, error messages) goes through this one function.
    A ``Text`` is printed as it is: ``[/]`` cannot close a tag (rich's ``MarkupError``), ``\\[``
    keeps its backslash and ``:smile:`` stays a word, which escaping a markup string does not
    guarantee. Compose it with ``Text.assemble`` (never inside an f-string, which would turn it
    back into markup).
    """
    return Text(clean(value), style=style)


def plain(text: str) -> str:
    """Plain output (JSON, CSV, markdown, token lists): lines kept, other control characters escaped.

    ``\\u`` + four hex digits is also a JSON escape, so JSON output stays valid and decodes to the same text.
    """
    return _UNSAFE_PLAIN.sub(_visible, text)


class _CleanRecords(logging.Filter):
    """Log messages carry paths and labels too: make their control characters visible."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = clean(record.getMessage()), None
        return True


NAME_WIDTH = 40  # a class name or word shown inside a sentence or a table cell


def abbreviate(text: str, width: int = NAME_WIDTH) -> str:
    """``text`` cut to ``width`` characters with an ellipsis, for a user's name inside a line: one
    class name of a thousand characters made a summary's row or a report's sentence a page long."""
    return text if len(text) <= width else text[: width - 1] + "…"


def data_text(text: object) -> str:
    """Text that comes from the user's data (class names, titles, words, paths) made safe to print
    inside rich markup (control characters made visible by :func:`clean`, markup escaped). Prefer
    :func:`safe` (a ``Text``, never parsed); this is for the few places that compose markup."""
    from rich.markup import escape

    return escape(clean(text))


def show(table: Any, target: Console | None = None) -> None:
    """Print a table without ever cutting a number or a word.

    In a terminal every column wraps (folds) instead of ending in an ellipsis. Off a terminal
    (logs, CI, pipes), where no one resizes a window, the table is printed at its natural width,
    however wide, every cell on one line (``sicot report --format markdown`` gives Markdown).
    """
    from rich.measure import Measurement

    target = target or console
    for col in table.columns:
        col.overflow = "fold"
    if target.is_terminal:
        for col in table.columns:
            col.no_wrap = False
        # narrower than its longest words with the cells' padding (an epoch table in 80 columns):
        # without it, rather than split "53.61" into "53." and "61"
        if Measurement.get(target, target.options.update(width=10**5), table).minimum > target.width:
            table.padding = (0, 0)
        target.print(table)
        return

    for col in table.columns:
        col.no_wrap = True
    width = max(target.width, Measurement.get(target, target.options.update(width=10**5), table).maximum)
    wide = Console(
        file=target.file,
        width=width,
        highlight=False,
        no_color=target.no_color,
        color_system=target.color_system and "standard",
    )
    wide.print(table)


def setup_logging(verbose: bool) -> None:
    """Route library logging through rich on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_CleanRecords())
    # torch's own INFO lines ("FakeTensor cache stats" at exit after an export) are not sicot's
    for noisy in ("gensim", "jieba", "smart_open", "PIL", "matplotlib", "h5py", "torch", "onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def error_line(message: str) -> None:
    """Print one red error line (on standard error) and go on."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", safe(message, "red")), soft_wrap=True)


def fail(message: str, code: int = 2) -> None:
    """Print one red line and exit."""
    error_line(message)
    raise SystemExit(code)


# Arguments read, never written or recorded: a file name that is not UTF-8 is fine there (predict
# names it with a \udcXX escape).
READ_ONLY_ARGS = {("predict", "images")}


def _check_utf8(fn: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Refuse a path or text argument that holds bytes that are not UTF-8 (they reach Python as lone
    surrogates): it cannot be written into the JSON, TOML and HDF5 files a run keeps, and failed
    there after the work was done (a report half written, a prepared file decoded for nothing)."""
    for name, value in kwargs.items():
        if (fn.__name__, name) in READ_ONLY_ARGS:
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            text = str(v) if isinstance(v, (str, os.PathLike)) else ""
            if any("\ud800" <= ch <= "\udfff" for ch in text):
                raise SicotError(_not_utf8(text, name))


def _not_utf8(text: str, name: str) -> str:
    """Why an argument holds bytes Python could not decode: a name that is not UTF-8, or (the bytes
    are UTF-8) a shell whose locale is not, so Python decoded them as ASCII."""
    fs = sys.getfilesystemencoding()
    raw = os.fsencode(text)
    try:
        shown = raw.decode("utf-8")
    except UnicodeDecodeError:
        shown = raw.decode("utf-8", "backslashreplace")
        return (
            f"{shown}: not valid UTF-8 (argument {name}); sicot records names in its JSON, TOML and HDF5 files: "
            "rename it"
        )
    return (
        f"{shown.encode('ascii', 'backslashreplace').decode()}: this shell's locale is not UTF-8 (Python reads "
        f"file names as {fs}) (argument {name}); run with a UTF-8 locale, e.g. LANG=C.UTF-8, or PYTHONUTF8=1"
    )


def stop_on_sigterm() -> None:
    """SIGTERM (``timeout``, Slurm, ``docker stop``, ``kill``) stops a command as Ctrl-C does: the
    checkpoint saved, one line, exit 143; it ended the process at once, silently, losing the epoch."""
    # An ignored SIGTERM stays ignored (`trap '' TERM`, nohup-like wrappers), as Python leaves an ignored SIGINT
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, interrupt)


def utf8_streams() -> None:
    """Standard output and error that never fail on a character their encoding lacks (a non-UTF-8
    locale, ``PYTHONIOENCODING=ascii``): shown as a backslash escape instead of a traceback, which
    came after the work was done (a finished run's table, a prepared file's summary)."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("-", "")
        if encoding != "utf8" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def guard(fn: F) -> F:
    """Turn a user error raised anywhere below a command into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_utf8(fn, kwargs)
            return fn(*args, **kwargs)
        except SicotError as e:
            fail(str(e))
        except OSError as e:
            # A name longer than the filesystem allows, or a path inside a folder this user may not
            # read, can surface from any stat() of a path the user typed (Path.exists raises both
            # on Python 3.11): it is the user's path, not a bug.
            if e.errno == errno.ENAMETOOLONG:
                fail(f"{e.filename or 'a path'}: file name too long for this filesystem")
            if e.errno in (errno.EACCES, errno.EPERM):
                fail(
                    f"{e.filename or 'a path'}: permission denied; check the permissions of it and of the folders "
                    "above it, or choose another path"
                )
            if e.errno in WHERE_ELSE and e.filename:  # a folder made on a read-only or full disk
                fail(f"{e.filename}: cannot write ({e.strerror}){WHERE_ELSE[e.errno]}")
            raise
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]" + (" (SIGTERM)" if stop_code() == 143 else ""))
            raise SystemExit(stop_code()) from None

    return wrapper  # type: ignore[return-value]


HEARTBEAT_S = 60.0  # off a terminal (a log, CI, a batch job): a long task's progress line at most this often


class _Heartbeat:
    """Off a terminal, where no bar is drawn, a long task's progress as a log line at most every
    :data:`HEARTBEAT_S` seconds (a log showed nothing for minutes: an evaluation, an epoch)."""

    def __init__(self, description: str, total: int | None, silent: bool) -> None:
        self.description, self.total, self.done, self.silent = description, total, 0, silent
        self.t0 = self.said = time.monotonic()
        self._stop = threading.Event()
        if not silent and total is None:  # a stage with no count (a vocabulary, word vectors) never ticks
            threading.Thread(target=self._still_running, daemon=True).start()

    def _still_running(self) -> None:
        """A count-less stage's line every :data:`HEARTBEAT_S` seconds, until the stage ends (a stage done
        within it says nothing: short commands and their error lines stay as they were)."""
        while not self._stop.wait(HEARTBEAT_S):
            log.info("%s ... (%.0f s)", self.description, time.monotonic() - self.t0)

    def __enter__(self) -> _Heartbeat:
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()

    def tick(self, n: int) -> None:
        self.done += n
        if not self.silent and time.monotonic() - self.said >= HEARTBEAT_S:
            self.said = time.monotonic()
            of = f"/{self.total:,}" if self.total else ""
            log.info("%s: %s%s (%.0f s)", self.description, f"{self.done:,}", of, self.said - self.t0)


class _RichTask:
    def __init__(self, progress: Progress, task_id: Any, beat: _Heartbeat) -> None:
        self._p, self._id, self._beat = progress, task_id, beat

    def advance(self, n: int = 1, **fields: object) -> None:
        self._p.update(self._id, advance=n, **fields)
        self._beat.tick(n)


def _bar_columns() -> list[Any]:
    """The progress-bar layout of every sicot bar: description, bar, n/total, info, elapsed, ETA."""
    return [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    ]


class RichProgress:
    """The :class:`sicot_cli.progress.Progress` the CLI hands to library functions."""

    def __init__(self, extra: str = "") -> None:
        self.extra = extra

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[_RichTask]:
        bars = Progress(*_bar_columns(), console=err_console, transient=True, disable=not err_console.is_terminal)
        with bars as p, _Heartbeat(description, total, silent=not p.disable) as beat:
            yield _RichTask(p, p.add_task(description, total=total, info=""), beat)


class _AblationTask:
    def __init__(self, owner: AblationProgress, task_id: Any, share: float, beat: _Heartbeat) -> None:
        self._o, self._id, self._share, self._beat = owner, task_id, share, beat

    def advance(self, n: int = 1, **fields: object) -> None:
        self._o.bars.update(self._id, advance=n, **fields)
        self._beat.tick(n)
        if self._share and self._o.overall is not None:
            self._o.bars.update(self._o.overall, advance=n * self._share)


class AblationProgress:
    """One live display for a whole ``sicot ablate``: which run trains (k of N, its name), a bar
    over every epoch of every run with the ETA of the whole ablation, and the current epoch's step
    bar. One display, refreshed on its own: nested displays froze under the ablation's table.

    Off a terminal nothing animates; a line names each run as it starts.
    """

    def __init__(self, target: Console | None = None) -> None:
        self.target = target or err_console
        self.bars = Progress(
            *_bar_columns(),
            console=self.target,
            transient=True,
            disable=not self.target.is_terminal,
            speed_estimate_period=600.0,
        )
        self.overall: Any = None
        self.epochs = 1

    def __enter__(self) -> AblationProgress:
        self.bars.start()
        self.overall = self.bars.add_task("ablation", total=None, info="epochs")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def start_run(self, name: str, index: int, count: int, recipe: Any) -> None:
        """``sicot_cli.ablate.ablate``'s ``on_start``: the run about to train."""
        self.epochs = recipe.train.epochs
        self.bars.update(
            self.overall,
            total=count * self.epochs,
            completed=index * self.epochs,
            description=f"run {index + 1}/{count} {data_text(name)}",
        )
        if not self.target.is_terminal:
            self.target.print(f"run {index + 1}/{count}: {data_text(name)}")

    def line(self, text: str) -> None:
        """A line above the bars (a finished run)."""
        self.target.print(text)

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[_AblationTask]:
        tid = self.bars.add_task(description, total=total, info="")
        # an epoch's steps move the overall bar by one epoch in all
        share = 1.0 / total if description.startswith("epoch ") and total else 0.0
        try:
            with _Heartbeat(description, total, silent=not self.bars.disable) as beat:
                yield _AblationTask(self, tid, share, beat)
        finally:
            self.bars.remove_task(tid)
