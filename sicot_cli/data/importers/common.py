"""What the importers share: the manifest writer, the titles-file reader and the import summary."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sicot_cli.config import floor_share
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import LineBreakInField, atomic_path, csv_records, ensure_dir, read_text

COLUMNS = ("image", "title", "label", "split", "id")


@dataclass
class ImportSummary:
    """What an importer wrote, for the CLI's table and the tests."""

    dataset: str
    manifests: list[str]
    rows: int
    classes: int
    train: int = 0  # 0 when the manifest leaves the split to ``prepare``
    test: int = 0
    val: int = 0  # validation rows the manifest names (``prepare`` carves them otherwise)
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def parse_json(text: str) -> Any:
    """``json.loads`` whose every failure is a ``ValueError``.

    ``json`` itself also raises ``RecursionError`` for ``[[[[...]]]]`` nested ~100,000 deep, and a
    ``ValueError`` that is not a ``JSONDecodeError`` for an integer of 5,000 digits; the
    importers read files they did not write, so both are bad input, never a crash.
    """
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def load_json(path: Path, missing: str, damaged: str = "") -> Any:
    """Read a JSON file of a released dataset, or raise one error naming the file.

    Args:
        path: the file.
        missing: what to say when it does not exist (the command that creates it).
        damaged: what to add when it is not valid JSON.
    """
    text = read_text(path, missing=missing, hint=damaged)
    try:
        return parse_json(text)
    except ValueError as e:
        raise SicotError(f"{path}: not valid JSON ({e}){damaged}") from None


_INT = re.compile(r"[+-]?[0-9]{1,18}")


def ascii_int(value: object) -> int | None:
    """An integer written with ASCII digits (at most 18 of them), else None.

    ``str.isdigit`` is also true for ``'²'`` or ``'٣'``, which ``int`` then refuses or reads as
    another number; ids and class numbers in released files are plain ASCII.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value if abs(value) < 10**18 else None
    if isinstance(value, str) and _INT.fullmatch(value.strip()):
        return int(value.strip())
    return None


def clean_title(text: str) -> str:
    """One line of text: newlines and tabs become spaces (titles only carry words)."""
    return " ".join(text.split())


def manifest_path(image: Path, manifest_dir: Path) -> str:
    """The image path as the manifest stores it: relative when under the manifest's folder, else absolute."""
    image = Path(os.path.abspath(image))
    try:
        return image.relative_to(Path(os.path.abspath(manifest_dir))).as_posix()
    except ValueError:
        return str(image)


def write_manifest(path: Path, rows: list[dict[str, str]], with_split: bool, force: bool = True) -> None:
    """Write ``rows`` as a CSV manifest, atomically (temporary name, then rename).

    Args:
        path: the ``.csv`` file.
        rows: dicts with ``image``, ``title``, ``label``, ``id`` (and ``split`` when ``with_split``).
        with_split: write the ``split`` column.
        force: replace a file that holds something else (else see :func:`keep_edits`).
    """
    ensure_dir(path.parent)
    columns = [c for c in COLUMNS if with_split or c != "split"]
    if not force:
        text = io.StringIO(newline="")
        w = csv.DictWriter(text, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        keep_edits(path, text.getvalue().encode("utf-8"))
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def keep_edits(path: Path, content: bytes) -> None:
    """Refuse to replace ``path`` when it holds other bytes than ``content``: a manifest edited by
    hand, or written with other settings (``datasets fetch`` without ``--force``). The same file
    again is no change, so a second fetch with the same settings still runs.

    Raises:
        SicotError: naming the file, ``--force`` and ``--dir``.
    """
    try:
        old = path.read_bytes()
    except OSError:  # missing (the usual case), or unreadable: the write itself says what is wrong
        return
    if old != content:
        raise SicotError(
            f"{path}: already exists and differs from what this fetch writes (edited by hand, or written with "
            "other --test-per-class / --seed / --val-fraction / --val-seed by `sicot datasets import`, or by another sicot "
            "version); pass --force to replace it, or choose "
            "another --dir"
        )


def read_titles(path: Path) -> tuple[dict[str, str], Counter[str]]:
    """Read a user's titles file: ``id`` -> ``title``.

    CSV or TSV with a header naming ``id`` and ``title`` (other columns are ignored), or JSONL with
    one ``{"id": ..., "title": ...}`` object per line. The first title of a repeated id is kept.

    Returns:
        The titles, and counted problems (``duplicate id``, ``empty title``, ``bad line``).

    Raises:
        SicotError: missing or unreadable file, missing column, unknown file type.
    """
    text = read_text(path, "titles file", expected="a CSV/TSV/JSONL titles file")
    problems: Counter[str] = Counter()
    pairs: list[tuple[object, object]] = []
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        # not str.splitlines(): it also splits at U+2028, U+0085, \x1c... which JSON leaves unescaped
        for line in text.split("\n"):
            if not line.strip():
                continue
            try:
                obj = parse_json(line)
            except ValueError:
                problems["bad line"] += 1
                continue
            if not isinstance(obj, dict):
                problems["bad line"] += 1
                continue
            pairs.append((obj.get("id"), obj.get("title")))
    elif suffix in (".csv", ".tsv", ".txt"):
        # as the manifest reader: a stray quote in a CSV is an error, not the rest of the file in one
        # title; tab-separated text has no quoting (a title's quotes are its own)
        columns, records = csv_records(text, path, tsv=suffix != ".csv")
        for need in ("id", "title"):
            if need not in columns:
                raise SicotError(f"{path}: missing column {need!r} (a titles file has the columns id and title)")
        for _, r in records:
            if isinstance(r, LineBreakInField):  # a bare CR inside an unquoted field: not the row meant
                problems["bad line"] += 1
            else:
                pairs.append((r.get("id"), r.get("title")))
    else:
        raise SicotError(f"{path}: unknown titles file type {path.suffix!r} (use .csv, .tsv or .jsonl)")
    titles: dict[str, str] = {}
    for rid, title in pairs:
        if not isinstance(rid, str | int) or isinstance(rid, bool):
            problems["bad line"] += 1
            continue
        title = clean_title(title) if isinstance(title, str) else ""
        if not title:
            problems["empty title"] += 1
            continue
        key = str(rid).strip()
        if key in titles:
            problems["duplicate id"] += 1
            continue
        titles[key] = title
    return titles, problems


def group_validation(sizes_by_class: dict[str, dict[str, int]], fraction: float, seed: int) -> set[str]:
    """Whole near-duplicate groups for the validation rows, drawn from the training side.

    Per class (in name order), groups in a seeded order; a group is taken when it still fits in
    ``floor(fraction * the class's training images)`` in every class it has images in (so a class
    with fewer than ``1 / fraction`` images gives none, as ``prepare``'s own row-wise carving). A
    group's images in other classes go with it: validation never shares a group with training,
    which ``prepare``'s row-wise carving cannot promise.

    Args:
        sizes_by_class: class -> group -> the group's training images in that class.
        fraction: the validation share of each class, at most.
        seed: the draw's seed (one generator per class: a class's draw does not depend on the others').

    Returns:
        The groups whose images are validation rows.
    """
    sizes: dict[str, dict[str, int]] = defaultdict(dict)  # group -> class -> images
    for label, groups in sizes_by_class.items():
        for g, n in groups.items():
            sizes[g][label] = n
    budget = {label: floor_share(fraction, sum(groups.values())) for label, groups in sizes_by_class.items()}
    taken: Counter[str] = Counter()
    chosen: set[str] = set()
    for label in sorted(sizes_by_class):
        groups = sorted(sizes_by_class[label])
        random.Random(f"{seed}:val:{label}").shuffle(groups)
        for g in groups:
            if g not in chosen and all(taken[c] + n <= budget[c] for c, n in sizes[g].items()):
                chosen.add(g)
                taken.update(sizes[g])
    return chosen
