"""Writing files so that nothing half-written ever carries a final name."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sicot_cli.errors import SicotError


def tmp_name(path: Path) -> Path:
    """The temporary name ``path`` is written under: hidden, in the same folder (same filesystem)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# Fault injection for the kill tests (tests/test_reliability.py): when set, every atomic write
# pauses this many seconds after its temporary is written and before it is renamed, so that a
# SIGKILL can be aimed at the window in which a half-finished output exists.
FAULT_WRITE_DELAY = "SICOT_FAULT_WRITE_DELAY"


def _dead_tmp(tmp: Path) -> bool:
    pid = tmp.name.rsplit("-", 1)[-1]
    return pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists()


def remove_stale_tmp(path: Path) -> None:
    """Remove temporaries of ``path`` left by killed processes (their pid no longer runs)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        if _dead_tmp(tmp):
            tmp.unlink(missing_ok=True)


def remove_stale_tmps(folder: Path) -> list[Path]:
    """Remove every temporary in ``folder`` left by a killed process; returns what was removed."""
    removed = []
    for tmp in folder.glob(".*.tmp-*"):
        if tmp.is_file() and _dead_tmp(tmp):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents) or raise a user error saying why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SicotError(f"{path}: exists and is not a directory") from None
    except OSError as e:
        raise SicotError(f"{path}: cannot create the output directory ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SicotError(f"{path}: output directory is not writable (choose another with --out)")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to ``path``.

    On any error (or Ctrl-C) the temporary is removed and ``path`` is left as it was. Temporaries
    of ``path`` left by killed processes are removed first (a SIGKILL cannot clean up after itself).
    """
    remove_stale_tmp(path)
    tmp = tmp_name(path)
    try:
        yield tmp
        delay = os.environ.get(FAULT_WRITE_DELAY)
        if delay:
            time.sleep(float(delay))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise SicotError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one JSON line and fsync (a line is either fully there or ``read_jsonl`` drops it)."""
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise SicotError(f"{path}: cannot write ({e.strerror or e})") from None
