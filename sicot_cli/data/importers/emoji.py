"""The offline emoji benchmark: real images, real Chinese and English text, a natural long tail.

Two pinned npm packages carry it (fetched with ``npm pack``; no account, nothing beyond the registry):

- ``emoji-datasource-google@16.0.0`` (MIT; the Noto Emoji images are Apache-2.0,
  https://github.com/iamcal/emoji-data): ``img/google/64/<image>`` PNGs and ``emoji.json``, a list of
  ``{"unified", "image", "category", "subcategory", "has_img_google", "skin_variations": {tone:
  {"unified", "image", "has_img_google"}}}``;
- ``emojibase-data@17.0.0`` (MIT, https://emojibase.dev): ``<lang>/data.json``, a list of ``{"hexcode",
  "label", "tags", "skins": [{"hexcode", "label"}]}``, and ``<lang>/messages.json`` with the group and
  subgroup names.

The join is on the code point with the emoji presentation selector removed (``-FE0F``), so
``0023-FE0F-20E3`` and ``0023-20E3`` meet. One row per image: label = the emoji's subcategory (the
"Component" category, skin-tone and hair swatches, is dropped), title = the language's label and the
base emoji's tags. Both manifests (zh, en) hold the same rows and the same split.

The split is by base emoji, so the skin-tone variants of one emoji never sit on both sides: per class,
``min(test_per_class, n_base // 2)`` base emoji are drawn (seeded) for the test set, each contributing
its default image; their skin-tone variants are left out of both sides (near-duplicates would weight
one emoji six times in the test accuracy, and in training they would leak the test emoji). A class
with a single base emoji has no test image. Validation rows are whole base emoji with their
variants, about ``val_fraction`` of each class's training images (``prepare`` keeps a manifest's
own ``val`` rows; its row-wise carving put variants of a training emoji in 176 of emoji-zh's 267
validation rows).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sicot_cli.data.importers.common import (
    ImportSummary,
    ascii_int,
    clean_title,
    group_validation,
    load_json,
    write_manifest,
)
from sicot_cli.data.importers.npm import NpmPackage, fetch_packages
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import write_json

DATASOURCE = NpmPackage(
    name="emoji-datasource-google",
    version="16.0.0",
    integrity="sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    sha256="fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
    members=(r"emoji\.json", r"LICENSE", r"img/google/64/[0-9a-f-]+\.png"),
)
EMOJIBASE = NpmPackage(
    name="emojibase-data",
    version="17.0.0",
    integrity="sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    sha256="d01d0e2ca4e22cb402679532155342c71e2e871f25c32223c013b8b166ebdf5a",
    members=(r"LICENSE", r"(zh|en)/(data|messages)\.json"),
)
PACKAGES = (DATASOURCE, EMOJIBASE)
LANGUAGES = ("zh", "en")
IMAGES = "img/google/64"
DEFAULT_TEST_PER_CLASS = 5
DEFAULT_VAL_FRACTION = 0.1


def code(hexcode: str) -> str:
    """The join key: upper-case code points without the emoji presentation selector FE0F."""
    return "-".join(p for p in hexcode.upper().split("-") if p and p != "FE0F")


def _load(path: Path) -> Any:
    return load_json(path, "missing (run `sicot datasets fetch emoji` first)", "; delete its folder and fetch again")


def _texts(data: Any, where: Path) -> dict[str, tuple[str, list[str]]]:
    """code -> (label, tags) for every emoji and skin-tone variant (variants use the base's tags)."""
    if not isinstance(data, list):
        raise SicotError(f"{where}: expected a list of emoji")
    out: dict[str, tuple[str, list[str]]] = {}
    for e in data:
        if not isinstance(e, dict) or not isinstance(e.get("hexcode"), str):
            continue
        tags = [t for t in e.get("tags") or [] if isinstance(t, str)]
        out[code(e["hexcode"])] = (str(e.get("label", "")), tags)
        for s in e.get("skins") or []:
            if isinstance(s, dict) and isinstance(s.get("hexcode"), str):
                out[code(s["hexcode"])] = (str(s.get("label", "")), tags)
    return out


@dataclass
class _Image:
    id: str
    base: str
    label: str
    path: Path
    titles: dict[str, str]


def _images(folder: Path, skipped: Counter[str]) -> list[_Image]:
    src = folder / DATASOURCE.name
    entries = _load(src / "emoji.json")
    if not isinstance(entries, list):
        raise SicotError(f"{src / 'emoji.json'}: expected a list of emoji")
    entries = [e for e in entries if isinstance(e, dict)]
    texts = {
        lang: _texts(_load(folder / EMOJIBASE.name / lang / "data.json"), folder / EMOJIBASE.name / lang / "data.json")
        for lang in LANGUAGES
    }
    images: list[_Image] = []
    for e in sorted(entries, key=lambda e: (ascii_int(e.get("sort_order", 0)) or 0, str(e.get("unified")))):
        skins = e.get("skin_variations")
        variants = [e, *(v for v in (skins.values() if isinstance(skins, dict) else []) if isinstance(v, dict))]
        if e.get("category") == "Component":
            skipped["Component group (skin-tone and hair swatches)"] += len(variants)
            continue
        base = code(str(e.get("unified", "")))
        for v in variants:
            if not v.get("has_img_google") or not isinstance(v.get("image"), str):
                skipped["no Google image in the package"] += 1
                continue
            path = src / IMAGES / v["image"]
            if not path.is_file():
                skipped["image file missing"] += 1
                continue
            key = code(str(v.get("unified", "")))
            if any(key not in texts[lang] for lang in LANGUAGES):
                skipped["no emojibase entry (zh/en)"] += 1
                continue
            titles = {lang: clean_title(" ".join([texts[lang][key][0], *texts[lang][key][1]])) for lang in LANGUAGES}
            images.append(_Image(key, base, str(e.get("subcategory", "")), path, titles))
    return images


def _split(
    images: list[_Image], test_per_class: int, val_fraction: float, seed: int, skipped: Counter[str], val_seed: int
) -> list[tuple[_Image, str]]:
    by_class: dict[str, dict[str, list[_Image]]] = defaultdict(lambda: defaultdict(list))
    for im in images:
        by_class[im.label][im.base].append(im)
    out: list[tuple[_Image, str]] = []
    for label in sorted(by_class):
        groups = by_class[label]
        bases = sorted(groups)
        # One generator per class, seeded by (seed, class): a class's split does not depend on the others.
        rng = random.Random(f"{seed}:{label}")
        test = set(rng.sample(bases, min(test_per_class, len(bases) // 2)))
        for b in bases:
            members = groups[b]
            if b not in test:
                out += [(im, "train") for im in members]
                continue
            default = next((im for im in members if im.id == b), members[0])
            out.append((default, "test"))
            skipped["skin-tone variant of a test emoji (kept out of both sides)"] += len(members) - 1
    # Validation rows are whole base emoji too: prepare's row-wise carving would put skin-tone
    # variants of one emoji in training and validation both.
    sizes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for im, side in out:
        if side == "train":
            sizes[im.label][im.base] += 1
    val = group_validation(sizes, val_fraction, val_seed)
    return [(im, "val" if side == "train" and im.base in val else side) for im, side in out]


def import_emoji(
    folder: Path,
    test_per_class: int = DEFAULT_TEST_PER_CLASS,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    force: bool = True,
    val_seed: int | None = None,
) -> ImportSummary:
    """Write ``emoji-zh.csv``, ``emoji-en.csv`` and ``emoji-classes.json`` into ``folder``.

    Args:
        folder: where ``sicot datasets fetch emoji`` unpacked the two packages.
        test_per_class: test images (distinct base emoji) per class, at most half a class's base emoji.
        seed: the split's seed.
        val_fraction: about this fraction of each class's training images become validation rows,
            whole base emoji with their skin-tone variants (``prepare`` keeps a manifest's own ``val`` rows).
        force: replace a manifest that holds something else (``fetch`` without ``--force``: refused).
        val_seed: the validation draw's seed (default: ``seed``); another value re-draws the
            validation rows only, the test rows unchanged (validation folds, docs/datasets.md).

    Raises:
        SicotError: missing or unreadable package files, a bad ``test_per_class`` or ``val_fraction``.
    """
    if folder.exists() and not folder.is_dir():
        raise SicotError(f"{folder}: is a file; --dir names the folder `sicot datasets fetch emoji` unpacked into")
    if test_per_class < 0:
        raise SicotError(f"--test-per-class must be >= 0, got {test_per_class}")
    if not 0 <= val_fraction <= 0.5:
        raise SicotError(f"--val-fraction must be in [0, 0.5], got {val_fraction}")
    skipped: Counter[str] = Counter()
    split = _split(
        _images(folder, skipped), test_per_class, val_fraction, seed, skipped, seed if val_seed is None else val_seed
    )
    if not split:
        raise SicotError(f"{folder}: no usable emoji image found")
    manifests = []
    for lang in LANGUAGES:
        path = folder / f"emoji-{lang}.csv"
        rows = [
            {
                "image": im.path.relative_to(folder).as_posix(),
                "title": im.titles[lang],
                "label": im.label,
                "split": s,
                "id": im.id,
            }
            for im, s in split
        ]
        write_manifest(path, rows, with_split=True, force=force)
        manifests.append(str(path))
    names: dict[str, dict[str, str]] = defaultdict(dict)
    for lang in LANGUAGES:
        messages = _load(folder / EMOJIBASE.name / lang / "messages.json")
        for sub in messages.get("subgroups", []) if isinstance(messages, dict) else []:
            if isinstance(sub, dict) and "key" in sub:
                names[str(sub["key"])][lang] = str(sub.get("message", ""))
    counts = Counter(im.label for im, _ in split)
    write_json(
        folder / "emoji-classes.json",
        {c: {"images": counts[c], **names.get(c, {})} for c in sorted(counts, key=lambda c: (-counts[c], c))},
    )
    n_test = sum(1 for _, s in split if s == "test")
    n_val = sum(1 for _, s in split if s == "val")
    return ImportSummary(
        dataset="emoji",
        manifests=manifests,
        rows=len(split),
        classes=len(counts),
        train=len(split) - n_test - n_val,
        val=n_val,
        test=n_test,
        skipped=dict(sorted(skipped.items())),
        notes=[
            f"validation images (whole base emoji, drawn from the training side): {n_val:,}",
            f"images per class: {max(counts.values())} down to {min(counts.values())}",
            f"class names: {folder / 'emoji-classes.json'}",
        ],
    )


def fetch_emoji(
    folder: Path,
    npm: str | None = "auto",
    test_per_class: int = DEFAULT_TEST_PER_CLASS,
    seed: int = 0,
    packages: tuple[NpmPackage, ...] = PACKAGES,
    force: bool = False,
) -> ImportSummary:
    """Fetch (``npm pack``), verify and unpack the two packages into ``folder``, then import them.

    Packages already unpacked (with the pinned integrity) and tarballs already present (verified)
    are not fetched again.

    Args:
        folder: the download and output folder (``data/emoji`` by default in the CLI).
        npm: the npm executable; ``"auto"`` looks it up on PATH; None means not available.
        test_per_class: see :func:`import_emoji`.
        seed: see :func:`import_emoji`.
        packages: the pinned packages (tests pass their own tiny ones).
        force: replace a manifest edited since (or written with other settings); without it, refused.

    Raises:
        SicotError: npm missing while a tarball is missing (the message gives the commands to run),
            npm failing, checksum mismatch, unsafe archive, unreadable package files.
    """
    fetch_packages(folder, packages, npm)  # unscoped packages: each unpacks into folder/<name>
    return import_emoji(folder, test_per_class, seed, force=force)
