"""A copy of a prepared file whose every title is ONE word naming its class: co-training without shared words.

Run ``python -m benchmarks.label_titles --data data/demo.h5 --out data/demo-labeltitles.h5``, then
``sicot ablate --recipe recipes/demo.toml --data data/demo-labeltitles.h5 --encoders bilinear ...``
against the same baseline runs (a baseline reads no title). Every row's tokens become the single
word id ``class + 1`` (distinct per class; the vocabulary and vectors are the original file's, so
the file needs at least as many words as classes), the training word counts follow, and the
content checksum is recomputed. What it measures (docs/demo-pretraining.md, "What the titles
carry"): how much of co-training's gain needs words that several classes share.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import h5py
import numpy as np

from sicot_cli.data import dataset as ds
from sicot_cli.errors import SicotError


def label_titles(src: Path, dst: Path) -> ds.Prepared:
    """Write ``dst``: ``src`` with one class-naming word per title; returns it opened (checked)."""
    p = ds.open_prepared(src)
    if p.format != ds.FORMAT:
        raise SicotError(f"{src}: a format-1 (raw pixels) file is needed")
    if len(p.words) - 1 < p.num_classes:
        raise SicotError(f"{src}: {len(p.words) - 1} words for {p.num_classes} classes: one word per class is needed")
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        labels = f["labels"][()]
        tokens = np.zeros_like(f["tokens"][()])
        tokens[:, 0] = labels + 1
        f["tokens"][...] = tokens
        f["lengths"][...] = np.ones_like(f["lengths"][()])
        counts = np.bincount(labels[: int(f.attrs["n_train"])] + 1, minlength=len(f["vocab/counts"]))
        f["vocab/counts"][...] = counts[: len(f["vocab/counts"])]
        f.attrs["content_sha256"] = ds._sha256_v2(ds._read_hashed(f), f)
    return ds.open_prepared(dst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.label_titles", description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/demo.h5"))
    parser.add_argument("--out", type=Path, default=Path("data/demo-labeltitles.h5"))
    args = parser.parse_args(argv)
    p = label_titles(args.data, args.out)
    print(f"wrote {args.out}: {p.n:,} rows, {p.num_classes} classes, each title one word naming its class")


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
