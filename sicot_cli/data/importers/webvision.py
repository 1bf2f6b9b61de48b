"""WebVision 2.0 ("selected 1k"): seeded random classes, titles from the Google/Flickr meta files.

The released layout (https://data.vision.ee.ethz.ch/cvl/webvision/dataset2018.html and its README;
the same as WebVision 1.0's, which the dataset loaders of DivideMix and others read):

- ``info/train_filelist_google.txt`` and ``info/train_filelist_flickr.txt``: one ``<path> <class>``
  line per training image, ``<path>`` relative to the dataset root (``google/q0001/000000.jpg``);
- ``info/synsets.txt`` (optional here): line *i* names class *i* (``n01440764 tench, Tinca tinca``);
- ``meta/<source>/<query>.json``: the meta information of every image crawled for one query (the
  image's folder name), with its ``title`` and ``description``.

How a meta entry is matched to an image file is not spelt out in the README; this importer accepts
both plausible layouts: a JSON list (or a ``{"images": [...]}`` / id-keyed object) whose entries carry
an ``id`` equal to the file's stem (``000123``, leading zeros optional), and otherwise position
(``000123.jpg`` = entry 123, counting from 0). Flickr's ``description`` may be ``{"_content": text}``
(the Flickr API's form), which is unwrapped. Images without a meta entry or with an empty text are
left out and counted, so a mismatch shows as a large count, never as silently wrong titles.

The paper (§4.1): titles only, the 5 % noise filter (``text.*``), images without side information
thrown away, 1,000 classes "randomly picked out" of the 5,000: here ``random.Random(seed).sample``
over the sorted class ids. The validation set has no meta information, so the test set is drawn from
the training images by ``prepare`` (``data.test_per_class``; the paper: 59,040 test images for 1,000
classes).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from sicot_cli.data.importers.common import (
    ImportSummary,
    ascii_int,
    clean_title,
    load_json,
    manifest_path,
    write_manifest,
)
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import read_text

SOURCES = ("google", "flickr")
TEXTS = ("title", "title+description")


def _filelist(path: Path) -> list[tuple[str, int]]:
    lines = read_text(path, "file list", missing="not found (WebVision's info/ file list)").splitlines()
    out = []
    for n, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        cls = ascii_int(parts[1]) if len(parts) == 2 else None
        if cls is None:
            raise SicotError(
                f"{path}:{n}: expected '<image path> <class>' (the class in ASCII digits), got {line[:80]!r}"
            )
        out.append((parts[0], cls))
    return out


MAX_DEPTH = 20  # the deepest meta text field read as a title


def _text(value: Any, depth: int = 0) -> str:
    """The text of a meta field: a string, ``{"_content": ...}`` or a list of them (nested at most
    :data:`MAX_DEPTH` deep; deeper is not a title, and counts as none)."""
    if isinstance(value, str):
        return value
    if depth >= MAX_DEPTH:
        return ""
    if isinstance(value, dict):
        return _text(value.get("_content", ""), depth + 1)
    if isinstance(value, list):
        return " ".join(_text(v, depth + 1) for v in value)
    return ""


def _position(stem: str) -> int | None:
    """``000123`` -> 123; None for anything but ASCII digits (``'²'.isdigit()`` is True)."""
    return ascii_int(stem) if stem.isascii() and stem.isdigit() else None


class _Meta:
    """One query's meta file, looked up by image stem (``id`` field first, then position)."""

    def __init__(self, path: Path) -> None:
        data = load_json(path, "no such meta file") if path.exists() else []
        self.by_id: dict[str, dict[str, Any]] = {}
        if isinstance(data, dict) and isinstance(data.get("images"), list):
            data = data["images"]
        if isinstance(data, dict):  # keyed by id
            self.by_id = {self._key(k): v for k, v in data.items() if isinstance(v, dict)}
            data = []
        self.entries: list[Any] = data if isinstance(data, list) else []
        for e in self.entries:
            if isinstance(e, dict) and isinstance(e.get("id"), str | int) and not isinstance(e.get("id"), bool):
                self.by_id[self._key(e["id"])] = e

    @staticmethod
    def _key(value: object) -> str:
        s = str(value).strip()
        return str(int(s)) if _position(s) is not None else s

    def get(self, stem: str) -> dict[str, Any] | None:
        if self.by_id:
            return self.by_id.get(self._key(stem))
        i = _position(stem)
        if i is not None and i < len(self.entries) and isinstance(self.entries[i], dict):
            return self.entries[i]
        return None


def _class_names(root: Path) -> dict[int, str]:
    path = root / "info" / "synsets.txt"
    if not path.is_file():
        return {}
    lines = read_text(path, errors="replace").splitlines()
    names = {i: " ".join(line.split()) for i, line in enumerate(lines) if line.strip()}
    first: dict[str, int] = {}
    for i, name in names.items():
        if name in first:  # two classes under one label would be merged into one, silently
            raise SicotError(
                f"{path}:{i + 1}: names class {i} {name!r}, as line {first[name] + 1} names class {first[name]}: "
                "each line must name its class distinctly (WebVision's lines start with the WordNet id)"
            )
        first[name] = i
    return names


def import_webvision(
    root: Path,
    out: Path,
    classes: int = 1000,
    seed: int = 0,
    sources: tuple[str, ...] = SOURCES,
    text: str = "title",
    images: Path | None = None,
) -> ImportSummary:
    """Write the manifest of a seeded random selection of WebVision classes.

    Args:
        root: the dataset folder (with ``info/`` and ``meta/``).
        out: the manifest to write (``.csv``).
        classes: how many classes to pick (the paper: 1,000 of the 5,000); 0 = all.
        seed: the selection's seed.
        sources: ``google`` and/or ``flickr``.
        text: ``title`` (the paper) or ``title+description``.
        images: where the image paths of the file lists start (default: ``root``).

    Raises:
        SicotError: missing or malformed file lists, bad options, nothing with a title.
    """
    if text not in TEXTS:
        raise SicotError(f"--text must be one of {', '.join(TEXTS)}, got {text!r}")
    bad = [s for s in sources if s not in SOURCES]
    if bad or not sources:
        raise SicotError(f"--sources must name google and/or flickr, got {','.join(sources)!r}")
    listed = [(p, c) for s in sources for p, c in _filelist(root / "info" / f"train_filelist_{s}.txt")]
    all_classes = sorted({c for _, c in listed})
    if classes < 0 or classes > len(all_classes):
        raise SicotError(
            f"--classes must be between 0 and {len(all_classes)} (the classes in the file lists), got {classes}"
        )
    chosen = set(all_classes if classes == 0 else random.Random(seed).sample(all_classes, classes))
    names = _class_names(root)
    by_meta: dict[Path, list[tuple[str, int]]] = defaultdict(list)
    for p, c in listed:
        if c in chosen:
            parts = Path(p).parts
            by_meta[root / "meta" / parts[0] / f"{Path(p).parent.name}.json"].append((p, c))
    skipped: Counter[str] = Counter()
    rows: list[dict[str, str]] = []
    base = images or root
    for meta_path in sorted(by_meta):
        meta = _Meta(meta_path)
        for p, c in by_meta[meta_path]:
            entry = meta.get(Path(p).stem)
            if entry is None:
                skipped["no meta entry for the image"] += 1
                continue
            words = _text(entry.get("title"))
            if text == "title+description":
                words += " " + _text(entry.get("description"))
            title = clean_title(words)
            if not title:
                skipped[f"empty {text}"] += 1
                continue
            rows.append(
                {"image": manifest_path(base / p, out.parent), "title": title, "label": names.get(c, str(c)), "id": p}
            )
    if not rows:
        raise SicotError(f"{root}: no selected image has a {text} in meta/ (is the meta folder unpacked there?)")
    write_manifest(out, rows, with_split=False)
    return ImportSummary(
        dataset="webvision",
        manifests=[str(out)],
        rows=len(rows),
        classes=len({r["label"] for r in rows}),
        skipped=dict(sorted(skipped.items())),
        notes=[
            f"{len(chosen)} of {len(all_classes)} classes (seed {seed})",
            "no split column: `prepare` draws data.test_per_class test images per class",
        ],
    )
