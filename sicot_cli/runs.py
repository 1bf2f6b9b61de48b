"""Run directories describe themselves (timm, Lightning).

``runs/<name>/`` holds:

- ``config.json``: the resolved recipe, the encoder, the prepared file, its fingerprint (classes
  and vocabulary) and its content checksum (``content``: a resumed run continues on this data
  only), package versions and the git commit when there is one;
- ``metrics.jsonl``: one JSON object per epoch (losses, lr, images/s, validation metrics ``val_*``);
- ``checkpoint-last.pt`` (everything needed to resume exactly) and ``checkpoint-best.pt`` (the
  weights with the best VALIDATION top-1 so far; absent when the dataset has no validation rows), both written to a temporary name and renamed. Each is
  one header line ``SICOT-CHECKPOINT 1 <sha256>`` followed by the ``torch.save`` bytes; the
  checksum is verified on load, so a truncated or damaged file is refused by name instead of
  resuming from garbage;
- ``predictions.h5``: the test top-k labels and scores of the weights ``eval.select`` names;
- ``summary.json``: written last, so its presence means the run finished.

Nothing is overwritten: an existing run directory is refused unless the run is resumed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sicot_cli.errors import SicotError
from sicot_cli.fsutil import (
    append_jsonl,
    atomic_path,
    ensure_dir,
    exclusive,
    is_stale_tmp,
    read_regular,
    write_json,
)

if TYPE_CHECKING:
    from sicot_cli.data.dataset import Prepared

CONFIG = "config.json"
METRICS = "metrics.jsonl"
LAST = "checkpoint-last.pt"
BEST = "checkpoint-best.pt"
PREDICTIONS = "predictions.h5"
SUMMARY = "summary.json"
MAGIC = b"SICOT-CHECKPOINT 1 "  # + 64 hex digits of the payload's sha256 + "\n"
_HEADER = len(MAGIC) + 64 + 1

log = logging.getLogger(__name__)


def git_commit() -> str | None:
    """The commit of the sicot source tree, when it is a git checkout: the package's parent folder
    must be the repository's top level. An installed sicot inside another project's repository
    (``project/.venv/lib/...``) recorded that project's commit as sicot's."""
    source = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=source, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split("\n") if out.returncode == 0 else []
    if len(lines) < 2 or not lines[1].strip():
        return None
    try:
        ours = Path(lines[0]).resolve() == source
    except (OSError, RuntimeError):
        return None
    return lines[1].strip() if ours else None


def is_run(path: Path) -> bool:
    return (path / CONFIG).is_file()


def is_finished(path: Path) -> bool:
    return (path / SUMMARY).is_file()


# What a run directory holds (decouple.FEATURES too): the temporaries a killed run may leave are theirs.
RUN_FILES = (CONFIG, METRICS, LAST, BEST, PREDICTIONS, SUMMARY, "features.pt")


def _stale_run_tmp(path: Path) -> bool:
    """A temporary of one of :data:`RUN_FILES` (``.NAME.tmp-PID``) left by a process that no longer runs."""
    base = path.name[1:].rsplit(".tmp-", 1)[0] if path.name.startswith(".") and ".tmp-" in path.name else None
    ours = base is not None and (base in RUN_FILES or base.startswith("checkpoint-"))  # + classifier parts
    return ours and is_stale_tmp(path)


def check_resumable(run_dir: Path) -> None:
    """Refuse ``--resume`` early (before any data is read) on a folder that holds no run of ours.

    A missing or empty folder (a run killed before its ``config.json`` was renamed leaves one, or
    only its dead temporaries) is not refused: the run starts there (:func:`start_run`), when the
    command says what to train (``sicot train --resume`` alone is refused there by the CLI).

    Raises:
        SicotError: the path is a file, or a folder with files of its own and no ``config.json``.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise SicotError(f"{run_dir}: exists and is not a directory; pass --run-dir with a run folder")
    if run_dir.is_dir() and not is_run(run_dir):
        own = [p for p in run_dir.iterdir() if not _stale_run_tmp(p)]
        if own:
            raise SicotError(
                f"{run_dir}: not a run directory (no {CONFIG}), nothing to resume; pass --run-dir with a new folder"
            )


_HELD: set[tuple[int, int]] = set()  # (device, inode) of the folders this process holds


@contextmanager
def hold(run_dir: Path, flag: str = "--run-dir") -> Iterator[None]:
    """Hold ``run_dir`` (created when missing) for this process while it writes there.

    A second sicot process writing the same run (``train --resume`` twice, two ``ablate`` with one
    ``--out``) is refused at once, naming the holder's pid (:func:`sicot_cli.fsutil.exclusive`).
    A hold taken again inside this process (the CLI holds a run it resumes, then ``train`` does) is
    the same hold.

    Raises:
        SicotError: the path is a file, cannot be created, or another process holds it.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise SicotError(f"{run_dir}: exists and is not a directory; pass {flag} with a folder")
    ensure_dir(run_dir)
    st = run_dir.stat()
    key = (st.st_dev, st.st_ino)
    if key in _HELD:
        yield
        return
    with exclusive(run_dir, flag):
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)


def check_held(run_dir: Path) -> None:
    """Refuse to write on into ``run_dir`` when the folder there is no longer the one this process
    holds (removed, or removed and made again by another run: writing by path would mix two runs).

    Raises:
        SicotError: naming the folder; the caller stops before writing.
    """
    try:
        st = run_dir.stat()
        here = (st.st_dev, st.st_ino) in _HELD
    except OSError:
        here = False
    if not here:
        raise SicotError(
            f"{run_dir}: removed or replaced while this run was writing it: stopped (nothing more is written; "
            "another run may be writing there now)"
        )


def start_run(run_dir: Path, config: dict[str, Any], resume: bool) -> bool:
    """Create the run directory, or check it for ``--resume``; returns True when resuming.

    Raises:
        SicotError: the path exists and is not a directory; the directory exists and ``resume`` is
            False; or ``resume`` on a folder without ``config.json`` that holds files of its own
            (no run: its files are the user's and are left alone). A missing or empty folder starts.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise SicotError(f"{run_dir}: exists and is not a directory; pass --run-dir with a new folder")
    if run_dir.is_dir():
        # Half-written files of a killed run go first: the renamed ones are intact, and a folder
        # holding nothing else (killed before its config.json was renamed) is no run to protect.
        # Only temporaries of a run's own files: a user's ".notes.tmp-123" is not ours to delete.
        for tmp in run_dir.iterdir():
            if _stale_run_tmp(tmp):
                tmp.unlink(missing_ok=True)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not resume:
            if not is_run(run_dir):  # the user's own files: --resume would refuse them too
                raise SicotError(
                    f"{run_dir}: holds files and no run ({CONFIG}); they are left alone: pass --run-dir with a new "
                    "or empty folder"
                )
            raise SicotError(
                f"{run_dir}: run directory exists (pass --resume to continue it, or --run-dir to start another)"
            )
        check_resumable(run_dir)  # a folder of the user's own files is left alone
        for name in (LAST, METRICS, BEST):  # a folder (or link to one) where a run file goes
            if (run_dir / name).exists() and not (run_dir / name).is_file():
                raise SicotError(
                    f"{run_dir / name}: exists and is not a file; move it away (nothing was changed), then resume"
                )
        last = run_dir / LAST
        if not last.is_file():
            if is_finished(run_dir):
                return True
            lost_checkpoint(run_dir, repair=True)
            # killed before the first checkpoint: nothing to lose, start again in place
            (run_dir / METRICS).unlink(missing_ok=True)
            write_json(run_dir / CONFIG, config)
            return False
        return True
    if resume:  # killed before its config.json existed, or never started: nothing is lost by starting
        log.warning("%s: nothing to resume (no run here yet): starting it with the recipe given", run_dir)
    ensure_dir(run_dir)
    write_json(run_dir / CONFIG, config)
    return False


def lost_checkpoint(run_dir: Path, repair: bool = False) -> None:
    """Refuse a run whose ``metrics.jsonl`` records an epoch (or which holds ``checkpoint-best.pt`` of
    a later epoch than the first) while ``checkpoint-last.pt`` is gone. A best checkpoint of epoch 1
    alone is a run killed between its first two saves: removed, and the run starts again.

    An epoch's checkpoint is saved before its metrics line, so a recorded epoch means the checkpoint
    existed and was moved or deleted since: starting again in place would erase the run's history.

    Raises:
        SicotError: naming the checkpoint and the epochs recorded.
    """
    done = len(read_metrics(run_dir))
    if not done and (run_dir / BEST).is_file() and _first_epochs_best(run_dir / BEST):
        # killed between epoch 1's two checkpoints (best is saved first): epoch 1 was never recorded,
        # and training it again gives the same weights; with ``repair`` (train) the run starts again
        if repair:
            log.warning("%s: stopped while saving its first epoch's checkpoints: starting it again", run_dir)
            (run_dir / BEST).unlink()
        return
    if not done and (run_dir / BEST).is_file():  # saved after an epoch's validation: an epoch ended
        raise SicotError(
            f"{run_dir / LAST}: missing, but {BEST} is there, saved after an epoch ended: the run's checkpoint was "
            f"moved or deleted since; put it back to continue, start another run with --run-dir NEW_DIR, or (if "
            f"it was stopped during its first epoch) delete {BEST} to start it again here (nothing was changed)"
        )
    if done:
        raise SicotError(
            f"{run_dir / LAST}: missing, but {METRICS} records {done} finished epoch(s): the checkpoint was moved "
            "or deleted since; put it back to continue, or start another run with --run-dir NEW_DIR (nothing was "
            "changed here)"
        )


def _first_epochs_best(path: Path) -> bool:
    """``checkpoint-best.pt`` holds epoch 1's weights (a damaged one: no)."""
    try:
        return load_checkpoint(path).get("epoch") == 1
    except SicotError:
        return False


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run's ``config.json``.

    Raises:
        SicotError: not a run directory, or an unreadable config.
    """
    from sicot_cli.config import recipe_from_dict
    from sicot_cli.runschema import ConfigFile, check

    path = run_dir / CONFIG
    if not path.is_file():
        raise SicotError(f"{run_dir}: not a run directory (no {CONFIG}); runs are made by `sicot train`")
    config = _read_json(path, "unreadable run config")
    check(ConfigFile, config, path)
    recipe_from_dict(config["recipe"], f"{path}, field recipe")
    # Readers take the encoder from one or the other (report labels, resume checks, decouple): where the
    # recipe states it, they must agree. A second stage (sicot decouple) is image-only: its encoder is
    # its first run's, its recipe's "none".
    model = config["recipe"].get("model")
    stated = model.get("encoder") if isinstance(model, dict) else None
    stage = bool(config.get("stage"))
    if stated is not None and stated != ("none" if stage else config["encoder"]):
        said = (
            "a second stage (field stage) is image-only: 'none'" if stage else f"field encoder is {config['encoder']!r}"
        )
        raise SicotError(
            f"{path}: field recipe.model.encoder is {stated!r}, but {said}: "
            "a damaged or hand-edited run file (the two must agree)"
        )
    return config


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_regular(path).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise SicotError(f"{path}: {what} ({e})") from None


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's ``summary.json``, checked against its schema.

    Raises:
        SicotError: unreadable, or a field missing or of the wrong type (named).
    """
    from sicot_cli.runschema import SummaryFile, check

    path = run_dir / SUMMARY
    summary = _read_json(path, "unreadable")
    check(SummaryFile, summary, path)
    return summary


def scored_checkpoint(run_dir: Path, given: str | None = None) -> str:
    """``given`` when there is one, else the checkpoint a finished run's recorded scores come from
    (``best`` where it selected on validation, else ``last``): what ``evaluate``, ``predict``,
    ``export`` and ``serve`` use unless told. ``last`` for an unfinished run, or one whose summary
    cannot be read (its readers say why)."""
    if given is not None:
        return given
    if not is_finished(run_dir):
        return "last"
    try:
        final = read_summary(run_dir).get("final")
    except SicotError:
        return "last"
    chosen = final.get("checkpoint") if isinstance(final, dict) else None
    return chosen if chosen in ("last", "best") else "last"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch records; a torn last line (killed mid-write) is ignored.

    Raises:
        SicotError: any other line that is not UTF-8, not JSON or not a metrics record (named by
            file, line and field).
    """
    from sicot_cli.runschema import MetricsRecord, check

    path = run_dir / METRICS
    if not path.is_file():
        return []
    try:
        lines = read_regular(path).split(b"\n")
    except OSError as e:
        raise SicotError(f"{path}: cannot read ({e.strerror or e})") from None
    if lines and not lines[-1].strip():
        lines.pop()
    out = []
    for n, line in enumerate(lines, start=1):
        try:
            record = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as e:
            if n == len(lines):  # a torn last line: the epoch it recorded is in the checkpoint
                break
            raise SicotError(f"{path}:{n}: not a JSON line ({e}): a damaged or hand-edited run file") from None
        check(MetricsRecord, record, path, f":{n}")
        if out and record["epoch"] <= out[-1]["epoch"]:  # a reader would take one of the two, silently
            raise SicotError(
                f"{path}:{n}: epoch {record['epoch']} after epoch {out[-1]['epoch']} (each epoch once, in order): "
                "a damaged or hand-edited run file"
            )
        out.append(record)
    return out


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite ``metrics.jsonl`` from a checkpoint's history (atomically)."""
    with atomic_path(run_dir / METRICS) as tmp:
        tmp.write_text(
            "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
        )


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    append_jsonl(run_dir / METRICS, record)


class _HashingWriter:
    """A write-only file that hashes what passes through (``torch.save`` only ever appends)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.sha256 = hashlib.sha256()
        self.error: OSError | None = None  # the first failed write (torch reports it as a RuntimeError)

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self._f.flush()


class _Payload(io.RawIOBase):
    """A read-only, seekable view of a file from ``offset`` on (what ``torch.load`` reads)."""

    def __init__(self, f: Any, offset: int) -> None:
        super().__init__()
        self._f, self._offset = f, offset
        f.seek(offset)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._f.readinto(buffer)

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(pos + self._offset if whence == io.SEEK_SET else pos, whence) - self._offset

    def tell(self) -> int:
        return self._f.tell() - self._offset


_CHUNK = 1 << 22  # bytes hashed per read when verifying a checkpoint


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` behind a checksummed header, to a temporary name, fsync, rename.

    Streamed: the payload goes to disk as ``torch.save`` produces it, hashed on the way, and the
    header's checksum is filled in at the end, so the state is never held a second time in RAM
    (at 1M classes x 2048 dims with momentum that would be 16 GB more).
    """
    import torch

    with atomic_path(path) as tmp, tmp.open("wb") as f:
        f.write(MAGIC + b"0" * 64 + b"\n")
        writer = _HashingWriter(f)
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is not None:  # a full disk: "cannot write (No space left on device)", not torch's words
                raise writer.error from None
            raise
        f.flush()
        f.seek(len(MAGIC))
        f.write(writer.sha256.hexdigest().encode("ascii"))


def _rebuild_hint(path: Path) -> str:
    if path.name == BEST:
        return f"use --checkpoint last, or retrain with `sicot train --run-dir NEW_DIR` and the recipe in {path.parent / CONFIG}"
    return (
        f"it cannot be repaired: retrain with `sicot train --run-dir NEW_DIR` and the recipe in {path.parent / CONFIG}"
        f" (a run of an ablation: delete {path.parent} and run the same `sicot ablate` again)"
    )


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint safely: checksum verified, then ``weights_only=True`` (tensors and plain data, no code).

    Files without the header (written before checksums) are loaded unverified.

    Raises:
        SicotError: missing, truncated, damaged (checksum mismatch) or not a sicot checkpoint; the
            message names the file and the command that rebuilds it.
    """
    import torch

    if not path.is_file():
        if path.exists():
            raise SicotError(f"{path}: not a checkpoint file (a directory or special file stands in its place)")
        raise SicotError(f"{path}: checkpoint not found")
    try:
        with path.open("rb") as f:
            head = f.read(_HEADER)
            offset = 0
            if head.startswith(MAGIC):  # verify the checksum in chunks: the file is never held in RAM
                want, digest = head[len(MAGIC) : _HEADER - 1], hashlib.sha256()
                for chunk in iter(lambda: f.read(_CHUNK), b""):
                    digest.update(chunk)
                if (
                    len(head) < _HEADER
                    or head[_HEADER - 1 : _HEADER] != b"\n"
                    or digest.hexdigest().encode("ascii") != want
                ):
                    raise SicotError(
                        f"{path}: corrupt checkpoint (checksum mismatch: truncated or damaged on disk); {_rebuild_hint(path)}"
                    )
                offset = _HEADER
            elif not head.startswith(b"PK"):  # torch.save's zip format, without our header
                raise SicotError(
                    f"{path}: not a sicot checkpoint ({'empty file' if not head else 'unknown format'}); {_rebuild_hint(path)}"
                )
            try:
                state = torch.load(_Payload(f, offset), map_location="cpu", weights_only=True)
            except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
                raise SicotError(f"{path}: unreadable checkpoint ({type(e).__name__}); {_rebuild_hint(path)}") from None
    except OSError as e:
        raise SicotError(f"{path}: cannot read the checkpoint ({e.strerror})") from None
    if not isinstance(state, dict) or "model" not in state or "meta" not in state:
        raise SicotError(f"{path}: not a sicot checkpoint")
    return state


def selection_line(final: dict[str, Any]) -> str:
    """Which split and which weights produced a run's final metrics, in words."""
    split = final.get("split")
    if split is None:  # a run finished before validation splits: scored on test every epoch
        return "test split, last epoch (an older run: its per-epoch scores were on test)"
    ckpt = final.get("checkpoint", "last")
    how = "best validation top-1" if final.get("selected_on") == "val" else "no selection"
    if final.get("logit_adjust_tau") is not None:
        scores = final.get("logit_adjust_val_scores")
        chosen = "fixed" if isinstance(scores, list) and len(scores) == 1 else "chosen on validation"
        how += f", post-hoc logit adjustment tau {final['logit_adjust_tau']:g} {chosen}"
    if final.get("stage"):  # a second stage (sicot decouple) on a frozen visual stream
        tau = final.get("tau")
        chosen = "chosen on validation" if final.get("selected_on") == "val" else "fixed"
        how = f"second stage {final['stage']}" + ("" if tau is None else f", tau {tau:g} {chosen}")
    return f"{split} split ({final.get('test_images', '?')} images), checkpoint {ckpt} (epoch {final.get('checkpoint_epoch', '?')}, {how})"


def default_run_name(recipe_name: str, encoder: str, seed: int) -> str:
    return f"{recipe_name}-{encoder}-s{seed}"


def finish(run_dir: Path, history: list[dict[str, Any]], per_class: dict[str, Any], final: dict[str, Any]) -> None:
    """Write ``summary.json`` (last: its presence marks the run finished).

    ``final`` holds the test metrics (scored once, after training) and which checkpoint and split
    produced them; ``history`` holds the per-epoch losses and validation metrics.
    """
    write_json(
        run_dir / SUMMARY, {"final": {**(history[-1] if history else {}), **final}, "epochs": len(history), **per_class}
    )


def check_dataset(prepared: Prepared, config: dict[str, Any], run_dir: Path) -> None:
    """Refuse a dataset whose classes, vocabulary or image size differ from the run's."""
    want, have = config.get("dataset", {}), prepared.fingerprint()
    if want != have:
        raise SicotError(
            f"{run_dir}: trained on a dataset with {want.get('classes')} classes / {want.get('vocab')} words "
            f"(fingerprint {want.get('sha256')}), but {prepared.path} has {have['classes']} / {have['vocab']} "
            f"({have['sha256']}): use the dataset the run was trained on"
        )
    size = (config.get("recipe") or {}).get("data", {}).get("image_size")
    if isinstance(size, int) and size != prepared.image_size:
        raise SicotError(
            f"{run_dir}: trained on {size} px images, but {prepared.path} holds {prepared.image_size} px images: "
            f"use a file prepared at data.image_size={size} (the run's own: {config.get('data')})"
        )
