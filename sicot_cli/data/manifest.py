"""The generic manifest: a CSV or JSONL file with one row per image.

Columns: ``image`` (a path relative to the manifest's folder, or absolute), ``title``, ``label``,
optional ``split`` (``train``/``val``/``test``) and ``id`` (defaults to the row number). Other columns are
refused so that a misspelt column (``lable``) is not silently ignored. The manifest is data: paths
are resolved (made absolute, ``..`` and symlinks followed) against the manifest folder, reported in
that form when a row is skipped, and only ever opened as images, never executed or expanded by a
shell. A UTF-8 BOM, CRLF line ends and NUL bytes are tolerated; JSONL lines end at ``\n`` only, so
a title holding U+2028 or another Unicode line separator stays one row.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from sicot_cli.data.skips import Skips
from sicot_cli.errors import SicotError

REQUIRED = ("image", "title", "label")
# csv's default field limit (128 KiB) would refuse a whole manifest for one runaway title; titles
# are cut to data.max_title_tokens words later anyway.
FIELD_LIMIT = 1 << 26
OPTIONAL = ("split", "id")
SPLITS = ("train", "val", "test")  # "validation" is read as "val"


@dataclass
class Row:
    """One usable manifest row."""

    where: str  # "file:row" for messages
    id: str
    image: Path
    title: str
    label: str
    split: str | None


def _bad_text(value: str) -> bool:
    # surrogateescape turns undecodable bytes into lone surrogates U+DC80..U+DCFF; JSON can also
    # spell any lone surrogate as an escape ("\ud800"), which no UTF-8 file or HDF5 string can hold
    return any("\ud800" <= ch <= "\udfff" for ch in value)


def _check_columns(columns: list[str], path: Path) -> None:
    unknown = [c for c in columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        raise SicotError(f"{path}: unknown column {unknown[0]!r} (columns: image, title, label, optional split, id)")
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise SicotError(f"{path}: missing column {missing[0]!r} (columns: image, title, label, optional split, id)")


def _records(path: Path, text: str, skips: Skips) -> list[tuple[int, dict[str, object]]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        out: list[tuple[int, dict[str, object]]] = []
        # not str.splitlines(): it also splits at U+2028, U+0085, \x1c... which JSON leaves unescaped
        for n, line in enumerate(text.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            if _bad_text(line):
                skips.add("line is not UTF-8", f"{path}:{n}")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                skips.add("not a JSON object", f"{path}:{n} ({e.msg})")
                continue
            except (ValueError, RecursionError):  # a 5000-digit integer, [[[[...]]]] nested too deep
                skips.add("not a JSON object", f"{path}:{n}")
                continue
            if not isinstance(obj, dict):
                skips.add("not a JSON object", f"{path}:{n}")
                continue
            _check_columns(list(obj), path)
            out.append((n, obj))
        return out
    if suffix in (".csv", ".tsv"):
        csv.field_size_limit(max(csv.field_size_limit(), FIELD_LIMIT))
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        try:
            columns = [c.strip() for c in reader.fieldnames or []]
        except csv.Error as e:
            raise SicotError(f"{path}: not a CSV file ({e})") from None
        if not columns:
            raise SicotError(f"{path}: empty manifest (no header row)")
        _check_columns(columns, path)
        reader.fieldnames = columns
        rows: list[tuple[int, dict[str, object]]] = []
        try:
            for record in reader:
                n = reader.line_num
                if None in record or any(v is None for v in record.values()):
                    skips.add("wrong number of fields", f"{path}:{n}")
                    continue
                if any(_bad_text(str(v)) for v in record.values()):
                    skips.add("line is not UTF-8", f"{path}:{n}")
                    continue
                rows.append((n, dict(record)))
        except csv.Error as e:
            raise SicotError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
        return rows
    raise SicotError(f"{path}: unknown manifest type {path.suffix!r} (use .csv, .tsv or .jsonl)")


def read_manifest(path: str | Path, skips: Skips) -> list[Row]:
    """Read and check a manifest.

    Args:
        path: the CSV/TSV/JSONL file.
        skips: where unusable rows are counted (missing field, bad split, duplicate id, bad text).

    Returns:
        The usable rows, in file order, with image paths resolved against the manifest's folder.

    Raises:
        SicotError: missing or unreadable file, unknown or missing column, malformed CSV.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SicotError(f"{path}: manifest not found") from None
    except IsADirectoryError:
        raise SicotError(f"{path}: is a directory, expected a CSV or JSONL manifest") from None
    except OSError as e:
        raise SicotError(f"{path}: cannot read the manifest ({e.strerror})") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text = data.decode("utf-8", errors="surrogateescape").replace("\x00", "")
    base = path.parent
    rows: list[Row] = []
    seen: set[str] = set()
    for n, rec in _records(path, text, skips):
        where = f"{path}:{n}"
        # NUL also arrives escaped in JSON ("\u0000"); HDF5 strings cannot hold it, and no title needs it
        values = {k: v.replace("\x00", "") if isinstance(v, str) else v for k, v in ((k, rec.get(k)) for k in REQUIRED + OPTIONAL)}
        if any(isinstance(v, str) and _bad_text(v) for v in values.values()):
            skips.add("text is not valid Unicode (lone surrogate)", where)
            continue
        bad = next((k for k in REQUIRED if not isinstance(values[k], str | int | float) or isinstance(values[k], bool)), None)
        if bad is not None:
            skips.add(f"missing {bad}", where)
            continue
        image = str(values["image"]).strip()
        label = str(values["label"]).strip()
        title = str(values["title"])
        if not image:
            skips.add("missing image", where)
            continue
        if not label:
            skips.add("missing label", where)
            continue
        split_raw = values["split"]
        split = str(split_raw).strip().lower() if split_raw not in (None, "") else None
        split = "val" if split == "validation" else split
        if split is not None and split not in SPLITS:
            skips.add("split is not train/val/test", where)
            continue
        rid = str(values["id"]).strip() if values["id"] not in (None, "") else str(n)
        if rid in seen:
            skips.add("duplicate id", where)
            continue
        seen.add(rid)
        try:
            img = (base / image).resolve()  # an absolute `image` replaces base
        except (OSError, RuntimeError, ValueError):  # symlink loop, NUL (stripped above, but be sure)
            skips.add("image path cannot be resolved", where)
            continue
        rows.append(Row(where, rid, img, title, label, split))
    return rows
