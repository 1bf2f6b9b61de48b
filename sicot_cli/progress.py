"""A tiny progress interface so library code reports progress without depending on rich.

Library functions take a :class:`Progress` and call ``task(...)``; the CLI passes a rich-backed
implementation (``sicot_cli.console.RichProgress``), tests and benchmarks the silent default.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields: object) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None) -> AbstractContextManager[Task]: ...


class _NullTask:
    def advance(self, n: int = 1, **fields: object) -> None:
        return None


class NullProgress:
    """Reports nothing."""

    def task(self, description: str, total: int | None) -> AbstractContextManager[Task]:
        return nullcontext(_NullTask())
