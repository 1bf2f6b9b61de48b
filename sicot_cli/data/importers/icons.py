"""The pretraining corpus: five icon sets from the npm registry, the stand-in for ImageNet offline.

Five pinned npm packages, all with licences that allow the use (MIT or ISC):

==========================  =======  ======================================================
package                     licence  what is read
==========================  =======  ======================================================
``@tabler/icons@3.52.0``    MIT      ``icons/{outline,filled}/*.svg``, ``icons.json`` (tags)
``lucide-static@1.62.0``    ISC      ``icons/*.svg``, ``tags.json``
``@phosphor-icons/core``    MIT      ``assets/{thin,light,regular,bold,fill,duotone}/*.svg``
``@2.1.1``
``bootstrap-icons@1.13.2``  MIT      ``icons/*.svg``
``@primer/octicons@19.42``  MIT      ``build/svg/*.svg``, ``build/data.json`` (keywords)
==========================  =======  ======================================================

Class = the icon's concept: its name without the style suffix (Tabler's outline and filled,
Bootstrap's ``-fill``, Phosphor's six weights, Octicons' 16/24 px drawings), pooled across the sets,
so "heart" holds every set's hearts in every style: the network learns what an icon shows, whatever
the stroke, weight, fill or artist. Concepts with fewer than :data:`MIN_IMAGES` images are left out.
Title = the name's words and the set's tags (unused by image-only pretraining; ``prepare`` needs one).

The sets' names and tags are also a text corpus, written beside the manifest as ``icon-words.txt``
(one sentence a line: a Tabler, Lucide or Octicons icon's name and tags, then every Phosphor and
Bootstrap name once): the English word2vec corpus that ``embed.corpus`` trains with the training
titles, as the paper's word vectors come from a corpus larger than its titles. Text only: no image
and no label of an evaluated dataset is in it (Tabler's categories are left out).

Each icon is rasterised with resvg to a 64 px PNG in one colour of a fixed palette, chosen by a stable
hash of the image's id: emoji are colourful, and colour must not name the class.

The corpus is disjoint from every evaluation dataset's images: no emoji artwork (the emoji benchmark
is Noto Emoji) and none of Material Design Icons (the ``mdi`` dataset); :func:`check_disjoint`
refuses a package list that shares a package with them.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sicot_cli.data.importers import emoji, mdi
from sicot_cli.data.importers.common import ImportSummary, clean_title, keep_edits, load_json, write_manifest
from sicot_cli.data.importers.npm import NpmPackage, fetch_packages
from sicot_cli.data.importers.svg import no_png_reason, palette_color, rasterise
from sicot_cli.errors import SicotError
from sicot_cli.fsutil import atomic_path, write_json

_SVG = r"[a-z0-9][a-z0-9-]*\.svg"
TABLER = NpmPackage(
    name="@tabler/icons",
    version="3.52.0",
    integrity="sha512-dldKlJNfO/gZnGLcIY0X2EFFKIMGwL/rEvTqglvBgAPFiwj9pZOCN5V3Sf0Gyjq6foX4VQmLdOmsS4w5FdWKAw==",
    sha256="626620c7d42afd2f294fba167ce4653b5cb946336d186b4991c70b700e5616af",
    members=(r"LICENSE", r"icons\.json", rf"icons/(outline|filled)/{_SVG}"),
)
LUCIDE = NpmPackage(
    name="lucide-static",
    version="1.62.0",
    integrity="sha512-WBZA/m2PvkFpMGHDtsBck5P2A9G4ehLlYu4GwwICcmEm1BvYVgj00lCDxKRWLlbMlOibLaiwdQ88G5pHkSWgwA==",
    sha256="386f9080c440d6f5049cefe3456ae8357f7a0c7f76e59670cd1cb83bc7050a44",
    members=(r"LICENSE", r"tags\.json", rf"icons/{_SVG}"),
)
PHOSPHOR = NpmPackage(
    name="@phosphor-icons/core",
    version="2.1.1",
    integrity="sha512-v4ARvrip4qBCImOE5rmPUylOEK4iiED9ZyKjcvzuezqMaiRASCHKcRIuvvxL/twvLpkfnEODCOJp5dM4eZilxQ==",
    sha256="313332be6190b724da24107addd781799b48bf76b13963f24501112ffe1baadd",
    members=(r"LICENSE", rf"assets/(thin|light|regular|bold|fill|duotone)/{_SVG}"),
)
BOOTSTRAP = NpmPackage(
    name="bootstrap-icons",
    version="1.13.2",
    integrity="sha512-fAU1Ly3dH7hwRg+CB8EZ0Vl0fF80zgXHeUVJyfUOKzoURr+TbwISbCW5tKUoQLERaWYG2emTCybcPbD96hdD1A==",
    sha256="7b5960145e1ab14a49a117f96a9e5a54a94fdf07f21e302d9e4f88d73dd19f9c",
    members=(r"LICENSE", rf"icons/{_SVG}"),
)
OCTICONS = NpmPackage(
    name="@primer/octicons",
    version="19.42.0",
    integrity="sha512-MEcHxVxNHu1I2Ndk5Mcwp7tfBiDk/EpytDJgKOfE2ldqIczWucVrZNeNU4wtEN5mnNudZ0YL5G0spax3bSMT4w==",
    sha256="8ae65252de0d8b24e068362c375533ef9a00fdf04e99f23d80df680d34138237",
    members=(r"LICENSE", r"build/data\.json", rf"build/svg/{_SVG}"),
)
PACKAGES = (TABLER, LUCIDE, PHOSPHOR, BOOTSTRAP, OCTICONS)
LICENCES = {TABLER.name: "MIT", LUCIDE.name: "ISC", PHOSPHOR.name: "MIT", BOOTSTRAP.name: "MIT", OCTICONS.name: "MIT"}
# The packages whose images are evaluated: the pretraining corpus must share none of them.
EVALUATED = {"emoji": emoji.PACKAGES, "mdi": mdi.PACKAGES}
SIZE = 64
PNG = "png"
MANIFEST = "icons.csv"
MIN_IMAGES = 4
CORPUS = "icon-words.txt"


@dataclass
class _Svg:
    set: str  # the package's folder name
    style: str
    name: str  # the concept (the class)
    path: Path
    tags: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.set}/{self.style}/{self.path.stem}"


def check_disjoint(
    packages: tuple[NpmPackage, ...] = PACKAGES, evaluated: dict[str, tuple[NpmPackage, ...]] = EVALUATED
) -> None:
    """Raise if a pretraining package is also a package of an evaluated dataset (any version)."""
    for dataset, theirs in evaluated.items():
        shared = sorted({p.name for p in packages} & {p.name for p in theirs})
        if shared:
            raise SicotError(
                f"the pretraining corpus shares {', '.join(shared)} with the evaluation dataset {dataset!r}: its images must be disjoint"
            )


def _json(path: Path) -> Any:
    if not path.exists():
        return None  # the tags are optional: a set without them keeps its names as titles
    return load_json(path, "missing", "; delete its folder and fetch again")


def _svgs(folder: Path) -> Iterator[Path]:
    return iter(sorted(folder.glob("*.svg")) if folder.is_dir() else [])


def _tabler(src: Path) -> Iterator[_Svg]:
    meta = _json(src / "icons.json") or {}
    for style in ("outline", "filled"):
        for p in _svgs(src / "icons" / style):
            tags = (
                meta.get(p.stem, {}).get("tags", [])
                if isinstance(meta, dict) and isinstance(meta.get(p.stem), dict)
                else []
            )
            yield _Svg(TABLER.folder, style, p.stem, p, tuple(str(t) for t in tags))


def _lucide(src: Path) -> Iterator[_Svg]:
    meta = _json(src / "tags.json") or {}
    for p in _svgs(src / "icons"):
        tags = meta.get(p.stem, []) if isinstance(meta, dict) and isinstance(meta.get(p.stem), list) else []
        yield _Svg(LUCIDE.folder, "regular", p.stem, p, tuple(str(t) for t in tags))


def _phosphor(src: Path) -> Iterator[_Svg]:
    for style in ("thin", "light", "regular", "bold", "fill", "duotone"):
        for p in _svgs(src / "assets" / style):
            name = p.stem.removesuffix(f"-{style}") if style != "regular" else p.stem
            yield _Svg(PHOSPHOR.folder, style, name, p)


def _bootstrap(src: Path) -> Iterator[_Svg]:
    for p in _svgs(src / "icons"):
        fill = p.stem.endswith("-fill")
        yield _Svg(BOOTSTRAP.folder, "fill" if fill else "regular", p.stem.removesuffix("-fill"), p)


def _octicons(src: Path) -> Iterator[_Svg]:
    meta = _json(src / "build" / "data.json") or {}
    for p in _svgs(src / "build" / "svg"):
        m = re.fullmatch(r"(.+)-(\d+)", p.stem)
        name, style = (m.group(1), f"{m.group(2)}px") if m else (p.stem, "regular")
        tags = (
            meta.get(name, {}).get("keywords", [])
            if isinstance(meta, dict) and isinstance(meta.get(name), dict)
            else []
        )
        yield _Svg(OCTICONS.folder, style, name, p, tuple(str(t) for t in tags))


def _tabler_words(src: Path) -> Iterator[tuple[str, Any]]:
    meta = _json(src / "icons.json") or {}
    for name, m in meta.items() if isinstance(meta, dict) else ():
        yield name, m.get("tags") if isinstance(m, dict) else None


def _lucide_words(src: Path) -> Iterator[tuple[str, Any]]:
    meta = _json(src / "tags.json") or {}
    yield from meta.items() if isinstance(meta, dict) else ()


def _octicons_words(src: Path) -> Iterator[tuple[str, Any]]:
    meta = _json(src / "build" / "data.json") or {}
    for name, m in meta.items() if isinstance(meta, dict) else ():
        yield name, m.get("keywords") if isinstance(m, dict) else None


# The sets whose metadata tags their icons: (name, tags) for each entry, in the file's order.
TAGGED: dict[str, Callable[[Path], Iterator[tuple[str, Any]]]] = {
    TABLER.name: _tabler_words,
    LUCIDE.name: _lucide_words,
    OCTICONS.name: _octicons_words,
}


READERS: dict[str, Callable[[Path], Iterator[_Svg]]] = {
    TABLER.name: _tabler,
    LUCIDE.name: _lucide,
    PHOSPHOR.name: _phosphor,
    BOOTSTRAP.name: _bootstrap,
    OCTICONS.name: _octicons,
}


def write_corpus(folder: Path, packages: tuple[NpmPackage, ...] = PACKAGES, force: bool = True) -> int:
    """Write ``folder/icon-words.txt``, the sets' names and tags as word2vec sentences; return their number.

    Every icon of a tagged set (:data:`TAGGED`) is one line, its name's words then its tags; the
    other sets' names follow, each once, sorted. Tokenized as titles are (lower-cased words).
    """
    from sicot_cli.data.tokenize import tokenize

    tagged: list[str] = []
    names: set[str] = set()
    for pkg in packages:
        src = folder / pkg.folder
        if pkg.name in TAGGED:
            for name, tags in TAGGED[pkg.name](src):
                words = [str(t) for t in tags] if isinstance(tags, list) else []
                tagged.append(" ".join([str(name).replace("-", " "), *words]))
        else:
            names.update(s.name.replace("-", " ") for s in READERS[pkg.name](src))
    lines = [" ".join(t) for t in map(tokenize, [*tagged, *sorted(names)]) if t]
    text = "".join(f"{line}\n" for line in lines)
    if not force:
        keep_edits(folder / CORPUS, text.encode("utf-8"))
    with atomic_path(folder / CORPUS) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return len(lines)


def import_icons(
    folder: Path, min_images: int = MIN_IMAGES, packages: tuple[NpmPackage, ...] = PACKAGES, force: bool = True
) -> ImportSummary:
    """Rasterise the icon sets and write ``icons.csv`` (no split column: ``prepare`` draws it).

    Args:
        folder: where ``sicot datasets fetch icons`` unpacked the packages.
        min_images: concepts with fewer images are left out.
        packages: the packages to read (each must have a reader in :data:`READERS`).
        force: replace a manifest or corpus that holds something else (``fetch`` without ``--force``: refused).

    Raises:
        SicotError: a package shared with an evaluation dataset, unreadable package files, no icons.
    """
    check_disjoint(packages)
    if min_images < 2:
        raise SicotError(f"min_images must be >= 2 (one to train, one to test), got {min_images}")
    by_name: dict[str, list[_Svg]] = defaultdict(list)
    for pkg in packages:
        if pkg.name not in READERS:
            raise SicotError(f"no reader for the icon package {pkg.name!r} (known: {', '.join(READERS)})")
        for s in READERS[pkg.name](folder / pkg.folder):
            by_name[s.name].append(s)
    kept = {n: v for n, v in by_name.items() if len(v) >= min_images}
    skipped = Counter(
        {f"concept with fewer than {min_images} images": sum(len(v) for n, v in by_name.items() if n not in kept)}
    )
    svgs = sorted((s for v in kept.values() for s in v), key=lambda s: s.id)
    if not svgs:
        raise SicotError(
            f"{folder}: no icon concept with {min_images} images or more (run `sicot datasets fetch icons` first)"
        )
    rasterise(((s.path, f"{s.id}.png", palette_color(s.id)) for s in svgs), folder / PNG, SIZE, "palette-v1")
    rows = []
    for s in svgs:
        if (folder / PNG / f"{s.id}.png").is_file():
            words = " ".join([s.name.replace("-", " "), *s.tags])
            rows.append({"image": f"{PNG}/{s.id}.png", "title": clean_title(words), "label": s.name, "id": s.id})
    if len(rows) < len(svgs):  # every icon without its image is counted, never dropped unsaid
        skipped[no_png_reason(folder / PNG)] = len(svgs) - len(rows)
    write_manifest(folder / MANIFEST, rows, with_split=False, force=force)
    sentences = write_corpus(folder, packages, force=force)
    counts = Counter(r["label"] for r in rows)
    per_set = Counter(r["id"].split("/")[0] for r in rows)
    write_json(
        folder / "icons-sets.json",
        {p.spec: {"licence": LICENCES.get(p.name, "?"), "images": per_set[p.folder]} for p in packages},
    )
    return ImportSummary(
        dataset="icons",
        manifests=[str(folder / MANIFEST)],
        rows=len(rows),
        classes=len(counts),
        skipped={k: v for k, v in sorted(skipped.items()) if v},
        notes=[
            f"images per concept: {max(counts.values())} down to {min(counts.values())}",
            "; ".join(f"{p.spec} ({LICENCES.get(p.name, '?')}): {per_set[p.folder]:,}" for p in packages),
            "disjoint from the evaluation datasets: " + ", ".join(EVALUATED),
            f"word2vec corpus: {folder / CORPUS} ({sentences:,} sentences of the sets' names and tags; embed.corpus)",
        ],
    )


def fetch_icons(
    folder: Path,
    npm: str | None = "auto",
    min_images: int = MIN_IMAGES,
    packages: tuple[NpmPackage, ...] = PACKAGES,
    force: bool = False,
) -> ImportSummary:
    """Fetch (``npm pack``), verify and unpack the icon sets into ``folder``, then import them.

    Args:
        folder: the download and output folder (``data/icons`` in the CLI).
        npm: the npm executable; ``"auto"`` looks it up on PATH; None means not available.
        min_images: see :func:`import_icons`.
        packages: the pinned packages (tests pass their own tiny ones).
        force: replace a manifest or corpus edited since; without it, refused.

    Raises:
        SicotError: see :func:`~sicot_cli.data.importers.npm.fetch_packages` and :func:`import_icons`.
    """
    check_disjoint(packages)  # before downloading anything
    fetch_packages(folder, packages, npm)
    return import_icons(folder, min_images, packages, force=force)
