"""Writing files so that nothing half-written ever carries a final name."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO

from sicot_cli.errors import WHERE_ELSE, SicotError


class NotRegularFileError(OSError):
    """A path that is a FIFO, socket or device: reading it could block forever or never end."""


def open_regular(path: str | Path) -> BinaryIO:
    """Open ``path`` for binary reading only if it is a regular file (the one check every reader uses).

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor (no race
    between check and open): a FIFO opened this way returns at once instead of waiting for a
    writer, and a device such as ``/dev/zero`` is refused instead of read without end.

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: as ``open`` would.
        NotRegularFileError: a FIFO, socket or device (``strerror`` says so).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(errno.EINVAL, "not a regular file (a FIFO, socket or device)", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path) -> bytes:
    """The bytes of a regular file (see :func:`open_regular`)."""
    with open_regular(path) as f:
        return f.read()


def read_text(
    path: str | Path,
    what: str | None = None,
    *,
    missing: str | None = None,
    expected: str | None = None,
    hint: str = "",
    errors: str = "strict",
) -> str:
    """A user's text file, decoded as UTF-8 (a leading BOM dropped): the one reader with friendly errors.

    Only a regular file is read (see :func:`open_regular`). Every failure is one :class:`SicotError`
    that starts with the path and says what the file was meant to be and what to do.

    Args:
        path: the file.
        what: what the file is, in the messages: "recipe" -> "cannot read the recipe (Permission
            denied)", "recipe not found"; None for the bare "cannot read (...)".
        missing: the message for a file that does not exist (default "<what> not found").
        expected: for a directory, the message "is a directory, expected <expected>" (default: the
            "cannot read (Is a directory)" line).
        hint: appended to the not-UTF-8 and cannot-read messages (e.g. "; delete its folder and fetch again").
        errors: ``bytes.decode``'s errors: "strict" (bytes that are not UTF-8 are an error naming the
            byte), "replace" or "surrogateescape" (never an error).

    Raises:
        SicotError: missing, a directory, not a regular file, unreadable, not UTF-8 (with "strict").
    """
    the = f" the {what}" if what else ""
    missing = missing or f"{what or 'file'} not found"
    try:
        data = read_regular(path)
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # Excel's "Unicode text": every line would be garbage
            raise SicotError(f"{path}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8{hint}")
        return data.decode("utf-8-sig", errors=errors)
    except FileNotFoundError:
        raise SicotError(f"{path}: {missing}") from None
    except IsADirectoryError as e:
        if expected is None:
            raise SicotError(f"{path}: cannot read{the} ({e.strerror}){hint}") from None
        raise SicotError(f"{path}: is a directory, expected {expected}") from None
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        again = hint or "; save it as UTF-8"
        raise SicotError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}, line {line}){again}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # the not-UTF-8 hint would mislead: there is no file to save again
            raise SicotError(f"{path}: a symbolic link loop (it leads back to itself); point it at a file") from None
        if e.errno == errno.ENOTDIR:  # nor here: a file stands where the path needs a folder
            raise SicotError(f"{path}: a file stands where this path needs a folder; check the path") from None
        if e.errno in (errno.EACCES, errno.EPERM):  # a permission, not the file's content
            raise SicotError(f"{path}: cannot read{the} (permission denied); check its permissions") from None
        if isinstance(e, NotRegularFileError):  # a pipe or device: nothing to save or fetch again
            raise SicotError(f"{path}: cannot read{the} ({e.strerror}); name a regular file") from None
        raise SicotError(f"{path}: cannot read{the} ({e.strerror or e}){hint}") from None
    except ValueError:  # a NUL in the path
        raise SicotError(f"{path}: not a valid path") from None


# csv's default field limit (128 KiB) would refuse a whole manifest for one runaway title; titles
# are cut to data.max_title_tokens words later anyway.
CSV_FIELD_LIMIT = 1 << 26


class LineBreakInField(dict):
    """A CSV/TSV record with a carriage return inside an unquoted field: only a quoted field may hold
    a line break, so the record is not what its writer meant (its reader counts it as a skip)."""


def _unquoted_crs(text: str, tsv: bool) -> tuple[str, str]:
    """``text`` with each CR inside a line (not at its end) outside a quoted field replaced by a marker, and the marker.

    The csv module ends a record at a bare CR, so ``red\rshirt`` in a title gave two records of
    the wrong length. CRs at a line's end (CRLF, CRCRLF) are line ends, and a file whose lines all
    end in CR alone (old Mac) has no LF: both are left as they are.
    """
    if "\r" not in text or "\n" not in text:
        return text, ""
    marker = next(chr(c) for c in range(0xE000, 0xF900) if chr(c) not in text)
    out, last, quotes = [], 0, 0
    i = text.find("\r")
    while i >= 0:
        end = i
        while end < len(text) and text[end] == "\r":
            end += 1
        if end == len(text) or text[end] == "\n":  # CRLF, or CRs before a line end (CRCRLF): a line end
            i = text.find("\r", end)
            continue
        if not tsv:
            quotes += text.count('"', last, i)  # an odd count: inside a quoted field, where a line break belongs
        out.append(text[last:i] + ("\r" if quotes % 2 else marker))
        last = i + 1
        i = text.find("\r", last)
    out.append(text[last:])
    return "".join(out), marker


class _Lines:
    """Lines for the csv reader, counting them and noting the first non-blank one read since
    ``first`` was reset: where a row starts, as an editor numbers it."""

    def __init__(self, lines: Iterator[str]) -> None:
        self._lines, self.n, self.first = lines, 0, None

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        line = next(self._lines)
        self.n += 1
        if self.first is None and line.strip("\r\n"):
            self.first = self.n
        return line


def csv_records(text: str, path: str | Path, tsv: bool) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]]]:
    """A user's CSV (strict quoting) or TSV (no quoting: a title's quotes are its own) text.

    Returns:
        The header's column names (stripped), and ``(line, record)`` for each record, ``line``
        being where it starts (a quoted field may run over several lines; lines end at line feeds). A record with too few fields has None values, one with too many a None key;
        one with a carriage return inside an unquoted field is a :class:`LineBreakInField`.

    Raises:
        SicotError: (while iterating) a quoted field that never closes, naming the line it starts on.
    """
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    dialect: dict[str, Any] = (
        {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"delimiter": ",", "strict": True}
    )
    text, marker = _unquoted_crs(text, tsv)
    # lines end at \n alone, as an editor counts them: a CR inside a quoted field is no line of its own;
    # a file without any \n ends its lines in CR alone (old Mac: Excel for Mac's "CSV (Macintosh)")
    end = "\n" if "\n" in text else "\r"
    lines = _Lines(line + end for line in text.removesuffix(end).split(end)) if text else _Lines(iter(()))
    reader = csv.DictReader(lines, **dialect)
    try:
        columns = [c.strip() for c in reader.fieldnames or []]
    except csv.Error as e:
        raise SicotError(f"{path}: not a CSV file ({e})") from None
    if marker:
        columns = [c.replace(marker, "\r") for c in columns]
    reader.fieldnames = columns

    def cut(record: dict[str, Any]) -> dict[str, Any]:
        values = [v for vs in record.values() for v in (vs if isinstance(vs, list) else [vs])]
        if not any(isinstance(v, str) and marker in v for v in values):
            return record
        put_back = {k: v.replace(marker, "\r") if isinstance(v, str) else v for k, v in record.items()}
        return LineBreakInField(put_back)

    def records() -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            while True:
                lines.first = None  # the line the next row starts on (blank lines skipped; it may span lines)
                record = next(reader, None)
                if record is None:
                    return
                yield lines.first or reader.line_num, cut(record) if marker else record
        except csv.Error as e:
            where = f"{path}: line {lines.first or lines.n}"
            if "field larger than field limit" in str(e):
                raise SicotError(
                    f"{where}: a field over {CSV_FIELD_LIMIT // 2**20} MiB (a runaway title, or a quote that never "
                    "closes and swallows the lines after it): shorten or remove that row"
                ) from None
            raise SicotError(
                f"{where}: malformed CSV ({e}; a quote opens a quoted field, which must "
                'close before the next comma: write a quote inside a field as "")'
            ) from None

    return columns, records()


def tmp_name(path: Path) -> Path:
    """The temporary name ``path`` is written under: hidden, in the same folder (same filesystem)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# Fault injection for the kill tests (tests/test_reliability.py): when set, every atomic write
# pauses this many seconds after its temporary is written and before it is renamed, so that a
# SIGKILL can be aimed at the window in which a half-finished output exists.
FAULT_WRITE_DELAY = "SICOT_FAULT_WRITE_DELAY"
# Seconds each image decode of `prepare` waits (tests only): worker pools live long enough to be
# seen, and interrupted, on a loaded machine.
FAULT_DECODE_DELAY = "SICOT_FAULT_DECODE_DELAY"


def _dead_tmp(tmp: Path) -> bool:
    pid = tmp.name.rsplit("-", 1)[-1]
    return pid.isascii() and pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists()


def remove_stale_tmp(path: Path) -> None:
    """Remove temporaries of ``path`` left by killed processes (their pid no longer runs)."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        if _dead_tmp(tmp):
            tmp.unlink(missing_ok=True)


def is_stale_tmp(path: Path) -> bool:
    """A temporary (``.NAME.tmp-PID``) left by a process that no longer runs."""
    return path.name.startswith(".") and ".tmp-" in path.name and path.is_file() and _dead_tmp(path)


def _name_max(folder: Path) -> int:
    while True:
        try:
            return os.pathconf(folder, "PC_NAME_MAX")
        except (OSError, ValueError):
            if folder.parent == folder:
                return 255
            folder = folder.parent


def check_name(path: Path) -> None:
    """Refuse a path whose file name, or its temporary name, is longer than the filesystem allows.

    Raises:
        SicotError: naming the limit, before anything is written.
    """
    longest = max(
        [len(p.encode("utf-8", "surrogateescape")) for p in path.parts]
        + [len(tmp_name(path).name.encode("utf-8", "surrogateescape"))]
    )
    limit = _name_max(path.parent)
    if longest > limit:
        raise SicotError(
            f"{path}: file name too long (at most {limit - len(tmp_name(Path('x')).name) + 1} bytes here, including the temporary name's suffix)"
        )


def file_to_write(raw: str, flag: str, what: str, example: str) -> Path:
    """An output option as the user typed it, refused when it names a folder: empty, ``.``, a
    trailing slash (which ``pathlib`` would drop, writing a FILE named after the folder), or an
    existing folder."""
    path = Path(raw)
    if raw.strip() in ("", ".", "..") or raw.endswith(("/", os.sep)) or path.is_dir():
        shown = raw.strip() or "."
        raise SicotError(f"{shown}: is a folder; {flag} names {what} to write (e.g. {path / example})")
    return path


def extension(path: Path) -> str:
    """The name's last ``.part``, lower-cased: ``.onnx`` for ``m.ONNX`` and for a file named ``.onnx``
    (``Path('.onnx').suffix`` is empty: export wrote such a name as TorchScript, and a manifest
    named ``.csv`` was of an "unknown type ''")."""
    name = path.name.lower()
    return name[name.rfind(".") :] if "." in name else ""


def exists(path: Path) -> bool:
    """``path.exists()`` that reports a name the system refuses (too long, NUL) as a user error."""
    try:
        return path.exists()
    except ValueError:
        raise SicotError(f"{path}: not a valid path") from None
    except OSError as e:
        raise SicotError(f"{path}: {e.strerror}") from None


def taken(path: Path) -> bool:
    """Whether an output name is in use: a file, a folder, or a symbolic link, even a dangling one
    (``exists`` follows the link and says no, and the write would replace the link unasked).

    Raises:
        SicotError: a name the system refuses (too long, NUL), as :func:`exists`.
    """
    try:
        return os.path.lexists(path) or path.exists()
    except ValueError:
        raise SicotError(f"{path}: not a valid path") from None
    except OSError as e:
        raise SicotError(f"{path}: {e.strerror}") from None


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents) or raise a user error saying why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SicotError(f"{path}: exists and is not a directory") from None
    except OSError as e:
        raise SicotError(f"{path}: cannot create the output directory ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SicotError(f"{path}: output directory is not writable (choose another place to write)")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to ``path``.

    On any error (or Ctrl-C) the temporary is removed and ``path`` is left as it was. Temporaries
    of ``path`` left by killed processes are removed first (a SIGKILL cannot clean up after itself).
    """
    check_name(path)
    remove_stale_tmp(path)
    tmp = tmp_name(path)
    try:
        _claim(tmp)
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
        raise SicotError(f"{path}: cannot write ({e.strerror or e}){WHERE_ELSE.get(e.errno, '')}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _claim(tmp: Path) -> None:
    """Create ``tmp`` as a new, empty regular file of ours. Whatever has this name (this process's
    pid) is not ours: a link planted in a downloaded folder would make the write go through it to a
    file elsewhere, so it is removed first, and the file is created exclusively, never following a
    link."""
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644))


class GuardedFile(io.RawIOBase):
    """A file for C libraries (HDF5) that must never see a failed write.

    HDF5 cannot recover from a write error: after ENOSPC inside ``H5Dwrite`` or a flush, the
    process crashes when the library shuts down (SIGSEGV at exit), whatever Python does. So the
    first failed write is recorded, not reported, and every later write is dropped; HDF5 closes
    normally, and the writer raises the recorded error from Python (:meth:`check`), where
    :func:`atomic_path` turns it into one "cannot write (No space left on device)" line and removes
    the temporary file.
    """

    def __init__(self, path: Path) -> None:
        self._f = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed in close()
        self.error: OSError | None = None

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def readinto(self, buffer: Any) -> int:
        return self._f.readinto(buffer)

    def write(self, data: Any) -> int:
        n = len(memoryview(data))
        if self.error is None:
            try:
                self._f.write(data)
            except OSError as e:
                self.error = e
        return n

    def truncate(self, size: int | None = None) -> int:
        if self.error is None:
            try:
                return self._f.truncate(size)
            except OSError as e:
                self.error = e
        return size or 0

    def flush(self) -> None:
        return None

    def check(self) -> None:
        """Raise the first write error, if any (call it from Python, between library calls)."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


@contextmanager
def guarded_file(tmp: Path) -> Iterator[GuardedFile]:
    """A :class:`GuardedFile` at ``tmp`` (inside :func:`atomic_path`); its write error is raised on exit."""
    guard = GuardedFile(tmp)
    try:
        yield guard
    finally:
        guard.close()
        guard.check()  # a full disk is the cause of whatever the writer saw after it


@contextmanager
def atomic_h5(path: Path) -> Iterator[Any]:
    """Yield an ``h5py.File`` open for writing under a temporary name; renamed to ``path`` when complete.

    Written through a :class:`GuardedFile`, so a full disk ends in one clean error (and no
    temporary file) instead of a crash in HDF5.
    """
    import h5py

    with atomic_path(path) as tmp, guarded_file(tmp) as guard, h5py.File(guard, "w") as f:
        yield f


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def json_file_state(path: Path, keys: tuple[str, ...]) -> str:
    """Whose JSON file ``path`` is, for a file sicot writes (atomically) and would replace:

    "ours": a JSON object with every one of ``keys``; "torn": empty, or a JSON object cut short or
    damaged (a copy cut off, a disk error: sicot's own, rewritten where that is safe); "foreign":
    anything else (someone's own file of that name, never replaced).
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM an editor added
    except (OSError, ValueError):
        return "foreign"
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return "torn" if not text.strip() or text.lstrip().startswith("{") else "foreign"
    if isinstance(obj, dict) and set(keys) <= obj.keys():
        return "ours"
    return "torn" if isinstance(obj, dict) and set(keys) & obj.keys() else "foreign"


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one JSON line and fsync (a line is either fully there or ``read_jsonl`` drops it)."""
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise SicotError(f"{path}: cannot write ({e.strerror or e})") from None


# Lock descriptors this process holds (:func:`exclusive`). A forked child (a decoding worker, a
# data-loader worker) closes its copies at once: it never holds the lock, so a killed sicot whose
# workers outlive it for a moment does not keep its output "in use". (The parent's descriptor keeps
# the lock: an flock lasts until every descriptor of its open file is closed.)
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _lock_holder(fd: int) -> str:
    """The pid holding a flock on ``fd``'s file, from ``/proc/locks`` ("" when it cannot be told)."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        fields = line.split()
        if "FLOCK" in fields and len(fields) >= 6 and fields[-3] == inode:
            return fields[-4]
    return ""


def _in_use(path: Path, fd: int, flag: str) -> SicotError:
    pid = _lock_holder(fd)
    who = f"another sicot process (pid {pid})" if pid else "another sicot process"
    return SicotError(f"{path}: in use by {who}; wait for it to finish, or choose another {flag}")


@contextmanager
def exclusive(path: Path, flag: str = "--out") -> Iterator[None]:
    """Hold ``path`` for one process: a second sicot writing the same output is refused at once.

    A folder (a run directory) is locked itself; a file (a prepared dataset) through a hidden
    ``.NAME.lock`` beside it, removed on exit. The lock is an ``flock``, so a killed process
    releases it with its last descriptor: nothing stale is left to clean up.

    Raises:
        SicotError: "<path>: in use by another sicot process (pid N)", naming ``flag`` as the way out.
    """
    import fcntl

    if path.is_dir():
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise _in_use(path, fd, flag) from None
            _HELD.add(fd)
            yield
        finally:
            _HELD.discard(fd)
            os.close(fd)
        return
    lock = path.with_name(f".{path.name}.lock")
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise SicotError(f"{path}: cannot write beside it ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            err = _in_use(path, fd, flag)
            os.close(fd)
            raise err from None
        try:  # the holder before us may have removed the name after we opened it: lock the live one
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    _HELD.add(fd)
    try:
        yield
    finally:
        with suppress(OSError):
            lock.unlink()
        _HELD.discard(fd)
        os.close(fd)
