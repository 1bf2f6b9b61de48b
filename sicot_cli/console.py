"""Everything rich: the consoles, progress bars, logging handler and the error line.

Library modules never import this; the CLI does.
"""

from __future__ import annotations

import errno
import functools
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sicot_cli.errors import SicotError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])

# What must never reach a terminal from data or the filesystem: C0 controls (ESC starts CSI/OSC
# sequences: OSC 0 sets the window title, OSC 52 writes the clipboard, CSI 2J clears the screen),
# DEL, C1 controls (U+009B is a one-character CSI) and the bidi embeddings, overrides and isolates
# that make a line display as something other than what it holds. Tab and newline are kept only
# where the output is plain text (``plain``), never inside a table cell or an error line.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_PLAIN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(m: re.Match[str]) -> str:
    return f"\\u{ord(m.group()):04x}"


def clean(value: object) -> str:
    """``value`` as one line of text: every control character shown as ``\\uXXXX``, never sent raw."""
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

    ``\\uXXXX`` is also a JSON escape, so JSON output stays valid and decodes to the same text.
    """
    return _UNSAFE_PLAIN.sub(_visible, text)


class _CleanRecords(logging.Filter):
    """Log messages carry paths and labels too: make their control characters visible."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = clean(record.getMessage()), None
        return True


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
    for noisy in ("gensim", "jieba", "smart_open", "PIL", "matplotlib", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> None:
    """Print one red line and exit."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", safe(message, "red")), soft_wrap=True)
    raise SystemExit(code)


def guard(fn: F) -> F:
    """Turn a user error raised anywhere below a command into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SicotError as e:
            fail(str(e))
        except OSError as e:
            # A name longer than the filesystem allows can surface from any stat() of a path the
            # user typed (Path.exists raises it): it is the user's path, not a bug.
            if e.errno != errno.ENAMETOOLONG:
                raise
            fail(f"{e.filename or 'a path'}: file name too long for this filesystem")
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


class _RichTask:
    def __init__(self, progress: Progress, task_id: Any) -> None:
        self._p, self._id = progress, task_id

    def advance(self, n: int = 1, **fields: object) -> None:
        self._p.update(self._id, advance=n, **fields)


class RichProgress:
    """The :class:`sicot_cli.progress.Progress` the CLI hands to library functions."""

    def __init__(self, extra: str = "") -> None:
        self.extra = extra

    @contextmanager
    def task(self, description: str, total: int | None) -> Iterator[_RichTask]:
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        ]
        with Progress(*columns, console=err_console, transient=True, disable=not err_console.is_terminal) as p:
            tid = p.add_task(description, total=total, info="")
            yield _RichTask(p, tid)
