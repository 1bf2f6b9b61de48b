"""The second real image+title dataset: Material Design Icons, one icon set with categories and names.

One pinned npm package carries it: ``@mdi/svg@7.4.47`` (https://pictogrammers.com; the icons are
Apache-2.0, the package's code MIT): ``svg/<name>.svg`` and ``meta.json``, a list of ``{"id",
"baseIconId", "name", "aliases", "tags", "deprecated"}``.

- Class = the icon's category (``tags``, e.g. "Food / Drink", "Transportation + Road"). An icon with no
  category, or with several (they disagree on what the icon is), has no single class and is left
  out, as are deprecated icons (in 7.4.47 that removes every brand logo): 3,820 icons in 59 classes,
  382 icons down to 3.
- Title = the icon's name and its aliases, words split at hyphens ("account plus register user plus
  person add account add"): human-written names, noisy (aliases repeat words, some are codes).
- Split by variant family: ``baseIconId`` links each variant (``-outline``, ``-off``, ``-plus``,
  ``-circle`` ...) to the icon it was drawn from; a family is one near-duplicate group. Per class,
  ``min(test_per_class, families // 2)`` families are drawn (seeded) for the test set, each
  contributing one icon (its base when the base is in the class); every other icon of a test family
  is left out of both sides, in every class, so no family sits on both sides.
- Validation rows are whole families too (``prepare`` keeps a manifest's own ``val`` rows instead of
  carving them row by row, which would put an icon's variants on both sides): per class, families
  in a seeded order, each one that still fits in 10 % of the class's training icons.

Images are rasterised with resvg to 64 px black-on-transparent PNGs (``svg/`` -> ``png/``).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sicot_cli.data.importers.common import ImportSummary, clean_title, group_validation, load_json, write_manifest
from sicot_cli.data.importers.npm import NpmPackage, fetch_packages
from sicot_cli.data.importers.svg import no_png_reason, rasterise
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import write_json

MDI = NpmPackage(
    name="@mdi/svg",
    version="7.4.47",
    integrity="sha512-WQ2gDll12T9WD34fdRFgQVgO8bag3gavrAgJ0frN4phlwdJARpE6gO1YvLEMJR0KKgoc+/Ea/A0Pp11I00xBvw==",
    sha256="de92e5dc9ce46c392ab5c53aa7190b19f82b40cb48872a083f788c7e13e91fef",
    members=(r"meta\.json", r"LICENSE", r"svg/[a-z0-9-]+\.svg"),
)
PACKAGES = (MDI,)
LICENCE = "Apache-2.0 (icons; Pictogrammers Free License), MIT (code)"
SIZE = 64
PNG = "png"
MANIFEST = "mdi.csv"
DEFAULT_TEST_PER_CLASS = 5
DEFAULT_VAL_FRACTION = 0.1


@dataclass
class _Icon:
    id: str
    name: str
    family: str
    label: str
    title: str


def _load(path: Path) -> Any:
    return load_json(path, "missing (run `sicot datasets fetch mdi` first)", "; delete its folder and fetch again")


def _family(icon: dict[str, Any], by_id: dict[str, dict[str, Any]]) -> str:
    """The root of the icon's ``baseIconId`` chain (a chain that loops or breaks ends where it does)."""
    seen = {icon["id"]}
    while (base := icon.get("baseIconId")) in by_id and base not in seen:
        seen.add(base)
        icon = by_id[base]
    return str(icon["id"])


def _icons(src: Path, skipped: Counter[str]) -> list[_Icon]:
    meta = _load(src / "meta.json")
    if not isinstance(meta, list):
        raise SicotError(f"{src / 'meta.json'}: expected a list of icons")
    by_id = {e["id"]: e for e in meta if isinstance(e, dict) and isinstance(e.get("id"), str)}
    icons = []
    for e in sorted(by_id.values(), key=lambda e: str(e.get("name"))):
        name, tags = e.get("name"), [t for t in e.get("tags") or [] if isinstance(t, str)]
        if not isinstance(name, str) or not name:
            skipped["no name"] += 1
        elif e.get("deprecated"):
            skipped["deprecated"] += 1
        elif len(tags) != 1:
            skipped["no category" if not tags else "several categories"] += 1
        elif not (src / "svg" / f"{name}.svg").is_file():
            skipped["SVG missing"] += 1
        else:
            aliases = [a for a in e.get("aliases") or [] if isinstance(a, str)]
            title = clean_title(" ".join(w.replace("-", " ") for w in [name, *aliases]))
            icons.append(_Icon(e["id"], name, _family(e, by_id), tags[0], title))
    return icons


def _split(
    icons: list[_Icon], test_per_class: int, val_fraction: float, seed: int, skipped: Counter[str], val_seed: int
) -> list[tuple[_Icon, str]]:
    by_class: dict[str, dict[str, list[_Icon]]] = defaultdict(lambda: defaultdict(list))
    for ic in icons:
        by_class[ic.label][ic.family].append(ic)
    test: list[_Icon] = []
    for label in sorted(by_class):
        families = sorted(by_class[label])
        # One generator per class, seeded by (seed, class): a class's draw does not depend on the others.
        rng = random.Random(f"{seed}:{label}")
        for fam in sorted(rng.sample(families, min(test_per_class, len(families) // 2))):
            members = by_class[label][fam]
            test.append(next((ic for ic in members if ic.id == fam), members[0]))
    test_ids = {ic.id for ic in test}
    test_families = {ic.family for ic in test}
    val_families = group_validation(
        {c: {f: len(m) for f, m in fams.items() if f not in test_families} for c, fams in by_class.items()},
        val_fraction,
        val_seed,
    )
    out: list[tuple[_Icon, str]] = []
    for ic in icons:
        if ic.id in test_ids:
            out.append((ic, "test"))
        elif ic.family in test_families:
            skipped["variant of a test icon's family (kept out of both sides)"] += 1
        else:
            out.append((ic, "val" if ic.family in val_families else "train"))
    return out


def import_mdi(
    folder: Path,
    test_per_class: int = DEFAULT_TEST_PER_CLASS,
    seed: int = 0,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    force: bool = True,
    val_seed: int | None = None,
) -> ImportSummary:
    """Rasterise the icons and write ``mdi.csv`` and ``mdi-classes.json`` into ``folder``.

    Args:
        folder: where ``sicot datasets fetch mdi`` unpacked the package.
        test_per_class: test icons (distinct families) per class, at most half a class's families.
        seed: the split's seed.
        val_fraction: about this fraction of each class's training icons become validation rows,
            whole families (``prepare`` keeps a manifest's own ``val`` rows).
        force: replace a manifest that holds something else (``fetch`` without ``--force``: refused).
        val_seed: the validation draw's seed (default: ``seed``); another value re-draws the
            validation rows only, the test rows unchanged (validation folds, docs/datasets.md).

    Raises:
        SicotError: missing or unreadable package files, a bad ``test_per_class`` or ``val_fraction``.
    """
    if folder.exists() and not folder.is_dir():
        raise SicotError(f"{folder}: is a file; --dir names the folder `sicot datasets fetch mdi` unpacked into")
    if test_per_class < 0:
        raise SicotError(f"--test-per-class must be >= 0, got {test_per_class}")
    if not 0 <= val_fraction <= 0.5:
        raise SicotError(f"--val-fraction must be in [0, 0.5], got {val_fraction}")
    src = folder / MDI.folder
    skipped: Counter[str] = Counter()
    icons = _icons(src, skipped)
    if not icons:
        raise SicotError(f"{src}: no icon with one category found")
    rasterise(
        ((src / "svg" / f"{ic.name}.svg", f"{ic.name}.png", "#000000") for ic in icons), folder / PNG, SIZE, "mdi-black"
    )
    drawn = _split(icons, test_per_class, val_fraction, seed, skipped, seed if val_seed is None else val_seed)
    split = [(ic, s) for ic, s in drawn if (folder / PNG / f"{ic.name}.png").is_file()]
    if len(split) < len(drawn):  # every row without its image is counted, never dropped unsaid
        skipped[no_png_reason(folder / PNG)] = len(drawn) - len(split)
    rows = [
        {"image": f"{PNG}/{ic.name}.png", "title": ic.title, "label": ic.label, "split": s, "id": ic.name}
        for ic, s in split
    ]
    write_manifest(folder / MANIFEST, rows, with_split=True, force=force)
    counts = Counter(ic.label for ic, _ in split)
    train_counts = Counter(ic.label for ic, s in split if s == "train")
    write_json(
        folder / "mdi-classes.json",
        {c: {"images": counts[c], "train": train_counts[c]} for c in sorted(counts, key=lambda c: (-counts[c], c))},
    )
    n_test = sum(1 for _, s in split if s == "test")
    n_val = sum(1 for _, s in split if s == "val")
    return ImportSummary(
        dataset="mdi",
        manifests=[str(folder / MANIFEST)],
        rows=len(split),
        classes=len(counts),
        train=len(split) - n_test - n_val,
        val=n_val,
        test=n_test,
        skipped=dict(sorted(skipped.items())),
        notes=[
            f"validation images (whole variant families, drawn from the training side): {n_val:,}",
            f"training images per class: {max(train_counts.values(), default=0)} down to {min(train_counts.values(), default=0)}",
            f"licence: {MDI.spec} {LICENCE}",
            f"class sizes: {folder / 'mdi-classes.json'}",
        ],
    )


def fetch_mdi(
    folder: Path,
    npm: str | None = "auto",
    test_per_class: int = DEFAULT_TEST_PER_CLASS,
    seed: int = 0,
    packages: tuple[NpmPackage, ...] = PACKAGES,
    force: bool = False,
) -> ImportSummary:
    """Fetch (``npm pack``), verify and unpack ``@mdi/svg`` into ``folder``, then import it.

    Args:
        folder: the download and output folder (``data/mdi`` in the CLI).
        npm: the npm executable; ``"auto"`` looks it up on PATH; None means not available.
        test_per_class: see :func:`import_mdi`.
        seed: see :func:`import_mdi`.
        packages: the pinned package (tests pass their own tiny one).
        force: replace a manifest edited since (or written with other settings); without it, refused.

    Raises:
        SicotError: see :func:`~sicot_cli.data.importers.npm.fetch_packages` and :func:`import_mdi`.
    """
    fetch_packages(folder, packages, npm)
    return import_mdi(folder, test_per_class, seed, force=force)
