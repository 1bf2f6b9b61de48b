"""Everything rich: the consoles, progress bars, logging handler and the error line.

Library modules never import this; the CLI does.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from sicot_cli.errors import SicotError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(verbose: bool) -> None:
    """Route library logging through rich on stderr."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("gensim", "jieba", "smart_open", "PIL", "matplotlib", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(message: str, code: int = 2) -> None:
    """Print one red line and exit."""
    err_console.print(f"[bold red]error:[/] [red]{escape(message)}[/]", soft_wrap=True)
    raise SystemExit(code)


def guard(fn: F) -> F:
    """Turn a user error raised anywhere below a command into one red line and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SicotError as e:
            fail(str(e))
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
