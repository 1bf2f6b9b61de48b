"""``sicot prepare`` throughput against raw decode+resize, measured in one run.

Run ``python -m benchmarks.prepare [--quick]``. A temporary folder gets N JPEG photos-like images
(varied sizes around 400x300, the size class of marketplace photos) and a manifest. First one
process decodes and resizes every image with the same function prepare uses (the raw per-core
rate); then ``prepare`` runs on all cores. Goal: prepare's decode+write rate >= 0.8 x (raw per-core
rate x cores). Results: ``benchmarks/results/prepare-cpu.json``.
"""

from __future__ import annotations

import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from benchmarks.common import benchmark_parser, parse, positive_int, start, write_results
from sicot_cli.config import load_recipe
from sicot_cli.data.images import load_image
from sicot_cli.data.prepare import prepare

GOAL = 0.8
USES_DEVICE = False  # prepare is CPU work: `python -m benchmarks all` passes it no --device


def make_images(root: Path, n: int, classes: int = 20, seed: int = 0) -> Path:
    """N JPEGs with smooth colour fields and noise (compress like photos), plus a manifest."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w, h = int(rng.integers(320, 480)), int(rng.integers(240, 360))
        yy, xx = np.mgrid[0:h, 0:w]
        base = rng.integers(0, 255, 3)
        img = (
            (
                base
                + 60 * np.sin(xx[..., None] / rng.uniform(5, 40) + yy[..., None] / rng.uniform(5, 40))
                + rng.normal(0, 8, (h, w, 3))
            )
            .clip(0, 255)
            .astype(np.uint8)
        )
        name = f"img{i:05d}.jpg"
        Image.fromarray(img).save(root / name, quality=90)
        label = f"class{i % classes}"
        rows.append({"image": name, "title": f"product {label} red cup {i % 7}", "label": label})
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        w = csv.DictWriter(f, ["image", "title", "label"])
        w.writeheader()
        w.writerows(rows)
    return manifest


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser("prepare", __doc__, quick="fewer images (< 1 min on a 2-core CPU)")
    parser.add_argument("--size", type=positive_int, default=64, help="prepared image size")
    args = parse(parser, argv)
    start()
    n = 300 if args.quick else 2000
    cores = os.cpu_count() or 1
    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        manifest = make_images(root, n)
        paths = sorted(root.glob("*.jpg"))
        t0 = time.perf_counter()
        for p in paths:
            load_image(p, args.size)
        raw = n / (time.perf_counter() - t0)
        recipe = load_recipe(
            None,
            [
                "data.source=manifest",
                f"data.manifest={manifest}",
                f"data.image_size={args.size}",
                "text.drop_most_frequent=0",
                "text.drop_least_frequent=0",
                "embed.epochs=1",
            ],
        )
        summary = prepare(recipe, root / "out.h5")
    ideal = raw * cores
    ratio = summary.images_per_second / ideal
    table = Table(
        title=f"prepare vs raw decode+resize ({n} JPEGs -> {args.size} px, {cores} cores)"
        + (" (quick)" if args.quick else "")
    )
    for col in ("measure", "images/s", "ratio"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    table.add_row("raw decode+resize, 1 process", f"{raw:,.0f}", "")
    table.add_row(f"ideal: raw x {cores} cores", f"{ideal:,.0f}", "1.00")
    table.add_row("prepare: decode+resize+write (all cores)", f"{summary.images_per_second:,.0f}", f"{ratio:.2f}")
    table.add_row(
        "prepare: whole command (tokenize, word2vec, write)",
        f"{n / summary.seconds:,.0f}",
        f"{n / summary.seconds / ideal:.2f}",
    )
    console.print(table)
    met = ratio >= GOAL
    console.print(
        f"goal: prepare >= {GOAL} x ideal: "
        + (f"[green]met[/] ({ratio:.2f})" if met else f"[red]not met[/] ({ratio:.2f})")
    )
    result = {
        "benchmark": "prepare",
        "quick": args.quick,
        "images": n,
        "image_size": args.size,
        "raw_images_per_s_one_process": raw,
        "cores": cores,
        "prepare_images_per_s": summary.images_per_second,
        "prepare_total_seconds": summary.seconds,
        "ratio_to_ideal": ratio,
        "goal": {"min_ratio": GOAL, "met": met},
    }
    console.print(f"wrote {write_results('prepare', 'cpu', result)}")
    return result


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
