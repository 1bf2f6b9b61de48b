"""The generic manifest: a CSV or JSONL file with one row per image.

Columns: ``image`` (a path relative to the manifest's folder, or absolute), ``title``, ``label``,
optional ``split`` (``train``/``val``/``test``) and ``id`` (defaults to the row's line number, and then
no row may have one: an explicit id could collide with another row's line number). Other columns
are refused so that a misspelt column (``lable``) is not silently ignored, and so is a column named
twice (which value would win?), in a CSV header or a JSON object.

Parsing is strict, so a damaged file is an error at the line where it breaks, never rows silently
merged: CSV follows RFC 4180 (a quote opens a quoted field that must close, then a comma; a quoted
field may hold commas and line breaks), while TSV has no quoting at all (IANA's
text/tab-separated-values: a title cannot hold a tab or a line break, and a ``"`` such as an inch
mark is an ordinary character). In JSONL, numbers are values, not spellings: the label ``7.0`` is
the label ``7`` (an integral number is written without a fraction, other numbers as Python writes
them), and NaN or Infinity is refused; in CSV every field is text, so ``7`` and ``7.0`` stay two
labels there. The manifest is data: paths
are resolved (made absolute, ``..`` and symlinks followed) against the manifest folder, reported in
that form when a row is skipped, and only ever opened as images, never executed or expanded by a
shell. A UTF-8 BOM, CRLF line ends and NUL bytes are tolerated; JSONL lines end at ``\n`` only, so
a title holding U+2028 or another Unicode line separator stays one row. A carriage return inside an
unquoted CSV/TSV field (a title written by a csv writer whose line end is ``\n`` alone) makes that
row a skip, "line break inside an unquoted field", not two short rows.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import re
import unicodedata
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sicot_cli.data.skips import Skips
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import LineBreakInField, csv_records, extension, read_text

REQUIRED = ("image", "title", "label")
OPTIONAL = ("split", "id")
log = logging.getLogger(__name__)

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
    twice = next((c for i, c in enumerate(columns) if c in columns[:i]), None)
    if twice is not None:
        raise SicotError(
            f"{path}: column {twice!r} appears twice in the header (columns: image, title, label, optional split, id)"
        )
    unknown = [c for c in columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        raise SicotError(f"{path}: unknown column {unknown[0]!r} (columns: image, title, label, optional split, id)")
    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise SicotError(f"{path}: missing column {missing[0]!r} (columns: image, title, label, optional split, id)")


def _records(path: Path, text: str, skips: Skips) -> list[tuple[int, dict[str, object]]]:
    suffix = extension(path)
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
                obj = json.loads(line, object_pairs_hook=_unique_keys)
            except _DuplicateKey as e:
                skips.add("JSON object names a key twice", f"{path}:{n} ({e})")
                continue
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
        columns, records = csv_records(text, path, tsv=suffix == ".tsv")
        if not columns:
            raise SicotError(f"{path}: empty manifest (no header row)")
        _check_columns(columns, path)
        rows: list[tuple[int, dict[str, object]]] = []
        for n, record in records:
            if isinstance(record, LineBreakInField):  # a bare CR in a title, say: not two short rows
                skips.add("line break inside an unquoted field", f"{path}:{n}")
                continue
            if None in record or any(v is None for v in record.values()):
                skips.add("wrong number of fields", f"{path}:{n}")
                continue
            if any(_bad_text(str(v)) for v in record.values()):
                skips.add("line is not UTF-8", f"{path}:{n}")
                continue
            swallowed = _swallowed_row(record, columns, "\t" if suffix == ".tsv" else ",", path.parent)
            if swallowed:
                skips.add(
                    "a quoted field holds the next row (a quote never closed?)", f"{path}:{n} (+{swallowed} line(s))"
                )
                continue
            rows.append((n, dict(record)))
        return rows
    raise SicotError(f"{path}: unknown manifest type {suffix!r} (use .csv, .tsv or .jsonl)")


_IMAGE_NAME = re.compile(r"[^/\\]\.(jpe?g|png|webp|gif|bmp|tiff?)$", re.IGNORECASE)


def _swallowed_row(record: dict[str, object], columns: list[str], sep: str, base: Path) -> int:
    """Lines of a quoted field that begin as a row of the manifest would: an image file of the
    manifest's folder (a name without spaces, with an image extension, that is there on disk) where
    the image column is. That is a quote that never closed, which took the next row into this one's
    field. Returns how many lines after the first the field runs over (0: no such line)."""
    at = columns.index("image")
    for value in record.values():
        lines = str(value).split("\n") if isinstance(value, str) and "\n" in value else []
        for line in lines[1:]:
            parts = line.split(sep)
            name = parts[at].strip().strip('"') if len(parts) > at else ""
            if name and not any(c.isspace() for c in name) and _IMAGE_NAME.search(name):
                with contextlib.suppress(OSError, ValueError):
                    if (base / name).is_file():
                        return len(lines) - 1
    return 0


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(repr(key))
        seen[key] = value
    return seen


def _text(value: object) -> str | None:
    """A JSONL value as manifest text: strings as they are, numbers by value (7.0 -> "7"); None if unusable."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        if value.is_integer():
            value = int(value)
    try:
        return str(value)
    except ValueError:  # an integer of more than 4,300 digits
        return None


# The folder a shipped recipe's manifest lies in -> the command that writes it (docs/datasets.md).
_MADE_BY = {
    "emoji": "sicot datasets fetch emoji",
    "mdi": "sicot datasets fetch mdi",
    "icons": "sicot datasets fetch icons",
    "webvision1k": "sicot datasets import webvision --root DIR (the WebVision 1.0 download)",
    "imaterialist2019": "sicot datasets import imaterialist2019 --root DIR (the Kaggle download)",
}


def _how_to_make(path: Path) -> str:
    """What writes the manifest of a shipped recipe, or how to name one's own."""
    made_by = _MADE_BY.get(path.parent.name)
    if made_by is not None:
        return f"`{made_by}` writes it (docs/datasets.md), or set data.manifest=PATH"
    return 'write one (image,title,label columns: README, "Your own data") and set data.manifest=PATH or --manifest'


# "https://...", "s3://..." (and, once a Path has folded it, "https:/..."); not "C:/..." (one letter)
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")


def _manifest_text(path: Path) -> str:
    """The manifest's text, NUL removed; a URL or a missing file is one error saying what to do.

    Bytes that are not UTF-8 are kept (surrogateescape): the rows they are in are skipped and counted.
    """
    if URL.match(str(path)) and not path.exists():  # Path() has already folded "//" to "/"
        shown = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]+):/(?!/)", r"\1://", str(path))
        raise SicotError(
            f"{shown}: a URL; the manifest is read from a local file: download it first, then give its path"
        )
    if not path.exists() and not path.is_symlink():
        raise SicotError(f"{os.path.normpath(path)}: manifest not found; {_how_to_make(path)}")
    return read_text(path, "manifest", expected="a CSV or JSONL manifest", errors="surrogateescape").replace("\x00", "")


def _image_path(base: Path, image: str, where: str, skips: Skips) -> Path | None:
    """A row's image resolved against the manifest's folder, or None with the reason counted (a URL, a link loop).

    A ``file://`` URL is the local path it names. A path whose folder or file name is spelt in the
    other Unicode normal form than on disk (``été`` composed in the manifest, decomposed by the
    zip a Mac made) is the file on disk."""
    local = urllib.parse.urlsplit(image) if image[:7].lower() == "file://" else None
    if local is not None and local.netloc in ("", "localhost"):
        image = urllib.parse.unquote(local.path)  # file:///data/a%20b.png is /data/a b.png
    if URL.match(image):
        skips.add("image is a URL (download the images first; the manifest names local files)", where)
        return None
    try:
        resolved = (base / image).resolve()  # an absolute `image` replaces base
        if not image.isascii() and not resolved.exists():  # an ASCII name has one normal form: no second stat
            other = base / unicodedata.normalize(
                "NFD" if image == unicodedata.normalize("NFC", image) else "NFC", image
            )
            if other.exists():
                return other.resolve()
        return resolved
    except (OSError, RuntimeError, ValueError) as e:  # symlink loop, NUL (stripped above, but be sure)
        loop = isinstance(e, RuntimeError) or getattr(e, "errno", None) == errno.ELOOP
        # the reason load_image gives a loop it meets; the path as the row gives it (joined to its folder)
        skips.add(
            "image path is a symbolic link loop" if loop else "image path cannot be resolved",
            f"{where} ({base / image})",
        )
        return None


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
    text = _manifest_text(path)
    base = path.parent
    rows: list[Row] = []
    seen: set[str] = set()
    records = _records(path, text, skips)
    with_id = [n for n, rec in records if rec.get("id") not in (None, "")]
    if with_id and len(with_id) < len(records):
        first = next(n for n, rec in records if rec.get("id") in (None, ""))
        raise SicotError(
            f"{path}:{first}: no id, but other rows have one (a row without id is named by its line number, which could be another row's id): give every row an id or none"
        )
    for n, rec in records:
        where = f"{path}:{n}"
        # NUL also arrives escaped in JSON ("\u0000"); HDF5 strings cannot hold it, and no title needs it
        values = {
            k: v.replace("\x00", "") if isinstance(v, str) else v
            for k, v in ((k, rec.get(k)) for k in REQUIRED + OPTIONAL)
        }
        if any(isinstance(v, str) and _bad_text(v) for v in values.values()):
            skips.add("text is not valid Unicode (lone surrogate)", where)
            continue
        texts = {k: _text(values[k]) for k in REQUIRED}
        bad = next((k for k in REQUIRED if texts[k] is None), None)
        if bad is not None:
            skips.add(f"missing {bad}" if values[bad] in (None, "") else f"{bad} is not text or a finite number", where)
            continue
        image = texts["image"].strip()
        # one class however its name was typed: "café" composed (NFC) and decomposed (NFD) are one label
        label = unicodedata.normalize("NFC", texts["label"].strip())
        title = texts["title"]
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
        rid = (_text(values["id"]) or "").strip() if values["id"] not in (None, "") else str(n)
        if not rid:
            skips.add("missing id", where)
            continue
        if rid in seen:
            skips.add("duplicate id", where)
            continue
        seen.add(rid)
        img = _image_path(base, image, where, skips)
        if img is not None:
            rows.append(Row(where, rid, img, title, label, split))
    _warn_case_twins(path, rows)
    _warn_lookalike_twins(path, rows)
    return rows


def _warn_twins(path: Path, groups: dict[str, dict[str, str]], shown: Callable[[str], str], what: str) -> None:
    """One warning for labels grouped as the same-looking class: ``groups`` maps a key to its spellings."""
    twins = [sorted(g.values()) for g in groups.values() if len(g) > 1]
    if twins:
        examples = "; ".join(" / ".join(shown(x) for x in t) for t in sorted(twins)[:3])
        more = f" and {len(twins) - 3} more" if len(twins) > 3 else ""
        log.warning(
            "%s: %d labels %s, and are separate classes (%s%s): spell each class's label one way in the manifest",
            path,
            sum(len(t) for t in twins),
            what,
            examples,
            more,
        )


def _warn_case_twins(path: Path, rows: list[Row]) -> None:
    """Labels that differ only in case (``cat``, ``Cat``) are separate classes, as written: say so once."""
    groups: dict[str, dict[str, str]] = {}
    for row in rows:
        groups.setdefault(row.label.casefold(), {})[row.label] = row.label
    _warn_twins(path, groups, repr, "differ from another only in case")


# Cyrillic and Greek letters drawn like Latin ones (Unicode's confusables, the common part): two
# labels that differ only in these, in invisible format characters (zero-width space or joiner,
# soft hyphen, bidi marks) or in compatibility forms (full-width, ligatures) look the same.
# ... and the dashes and quotes a word processor's autocorrect types for - ' and " (T-shirt, T–shirt;
# Men's, Men’s).
_LOOKALIKE = str.maketrans(
    "аеорсухіјѕԁӏһԛԝАВЕКМНОРСТХІЈЅҮονρΑΒΕΖΗΙΚΜΝΟΡΤΥΧ\u2010\u2011\u2012\u2013\u2014\u2015\u2212‘’‛′“”„″",
    "aeopcyxijsdlhqwABEKMHOPCTXIJSYovpABEZHIKMNOPTYX-------''''\"\"\"\"",
)


def _letters(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_LOOKALIKE)
    return "".join(c for c in text if unicodedata.category(c) != "Cf").casefold()


def _skeleton(label: str) -> str:
    """What a label looks like: look-alike letters, dashes and quotes as their ASCII twins, invisible
    characters dropped, case folded, and any run of spaces as one (``red  bag`` is ``red bag``)."""
    return " ".join(_letters(label).split())


def _shown(label: str) -> str:
    """A label with its invisible and look-alike characters spelt out (\\u0430), the rest as written."""
    odd = (c for c in label if unicodedata.category(c) == "Cf" or _letters(c) != c.casefold())
    marked = set(odd)
    return "'" + "".join(f"\\u{ord(c):04x}" if c in marked else c for c in label) + "'"


def _warn_lookalike_twins(path: Path, rows: list[Row]) -> None:
    """Labels that look alike but are spelt differently (``red`` and ``red`` + a zero-width space,
    ``cat`` with a Cyrillic ``а``) are separate classes, as written: say so once, naming examples.
    Labels that differ only in case are :func:`_warn_case_twins`'s."""
    groups: dict[str, dict[str, str]] = {}
    for row in rows:
        groups.setdefault(_skeleton(row.label), {}).setdefault(row.label.casefold(), row.label)
    _warn_twins(path, groups, _shown, "look like another but differ in invisible or look-alike characters or spacing")
