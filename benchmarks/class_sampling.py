"""Accuracy of class sampling: ``train.class_sample_rate`` at several rates x seeds, paired against exact.

Each (rate, seed) is one ordinary ``sicot train`` run (the library's :func:`sicot_cli.train.train`)
in ``--runs-dir``; a finished run is reused, so an interrupted measurement continues where it
stopped. The table gives top-1 and tail top-1 (image-only, over ALL classes: evaluation never
samples) as mean ± std over seeds, and each rate's difference to rate 1 (the exact softmax) with
the paired t-test over seeds.

Two sources of data:

- ``--recipe R`` (e.g. ``recipes/demo.toml``, ``recipes/emoji-zh.toml``): the recipe's prepared file
  (``sicot prepare --recipe R`` first);
- ``--many-classes N``: a cheap synthetic many-class set built here (the built-in generator stops at
  3,200 attribute combinations). Class ``c`` is a (colour, pattern) pair out of
  ``ceil(sqrt(N))`` colours and as many 4x4 binary patterns, drawn at ``--image-size`` px with a
  one-pixel jitter and noise; its title names the two attributes (``colour17 pattern4``), with one
  of them dropped in a quarter of the titles. Training counts follow a Zipf law from
  ``--max-per-class`` down to 2 (most classes are tail classes), 1 test image per class. The set is
  written as PNGs + a manifest and read by ``sicot prepare``, like any user data. On a shared
  2-core CPU a torchvision backbone at 10,000 classes takes many minutes per epoch, so
  ``--tiny-backbone`` trains a small convolutional stream (two strided 3x3 convolutions and a
  128-d projection, no batch-norm) with the ``mean`` text encoder through the same
  :func:`sicot_cli.train.train_step` (the sampled softmax and its SGD on sampled rows are the code
  under test) and evaluates with :func:`sicot_cli.evaluate.evaluate_model` over all classes.

Run (CPU, one thread per run)::

    python -m benchmarks.class_sampling --recipe recipes/demo.toml --rates 1,0.3,0.1 --seeds 0,1,2 model.encoder=bilinear
    python -m benchmarks.class_sampling --many-classes 10000 --tiny-backbone --rates 1,0.3,0.1 --seeds 0,1,2 train.epochs=4

Results: ``benchmarks/results/class_sampling-<name>.json``.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

USES_DEVICE = False


def many_class_manifest(root: Path, classes: int, image_size: int, max_per_class: int, seed: int = 0) -> Path:
    """Write the many-class set's PNGs and ``manifest.csv`` under ``root``; returns the manifest."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    side = math.ceil(math.sqrt(classes))
    colours = rng.integers(30, 226, (side, 3))
    patterns = rng.random((side, 4, 4)) < 0.5
    counts = np.maximum(2, np.round(max_per_class / (1 + np.arange(classes)) ** 0.8)).astype(int)
    rng.shuffle(counts)  # which classes are the head: no relation to the attribute ids
    cell = image_size // 4
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c in range(classes):
        colour, pattern = divmod(c, side)
        for i in range(counts[c] + 1):  # the last one is the test image
            img = np.full((image_size + 2, image_size + 2, 3), 255 - colours[colour] // 2, dtype=np.float64)
            mask = np.kron(patterns[pattern], np.ones((cell, cell))).astype(bool)
            img[1 : 1 + 4 * cell, 1 : 1 + 4 * cell][mask] = colours[colour]
            dy, dx = rng.integers(0, 3, 2)
            img = img[dy : dy + image_size, dx : dx + image_size] + rng.normal(0, 12, (image_size, image_size, 3))
            name = f"c{c}_{i}.png"
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name)
            words = [f"colour{colour}", f"pattern{pattern}"]
            if rng.random() < 0.25:
                words.pop(int(rng.integers(0, 2)))
            rows.append(
                {
                    "image": name,
                    "title": " ".join(words),
                    "label": f"class{c}",
                    "split": "test" if i == counts[c] else "train",
                }
            )
    path = root / "manifest.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["image", "title", "label", "split"])
        w.writeheader()
        w.writerows(rows)
    return path


def many_class_data(work: Path, classes: int, image_size: int, max_per_class: int) -> tuple[list[str], Path]:
    """The recipe overrides and the prepared file of the many-class set (built once)."""
    from sicot_cli.config import load_recipe
    from sicot_cli.data.prepare import prepare

    overrides = [
        "data.source=manifest",
        f"data.manifest={work / 'raw' / 'manifest.csv'}",
        f"data.image_size={image_size}",
        "data.workers=1",
        "text.drop_most_frequent=0",
        "text.drop_least_frequent=0",
        "text.min_count=1",
        "embed.dim=16",
        "embed.epochs=2",
        "eval.head_threshold=10",
        "eval.many_threshold=20",
        "eval.few_threshold=5",
        "train.eval_batch_size=1024",
    ]
    out = work / f"many-{classes}.h5"
    if not out.exists():
        many_class_manifest(work / "raw", classes, image_size, max_per_class)
        prepare(load_recipe(None, overrides), out)
    return overrides, out


def tiny_run(recipe, data: Path, run_name: str) -> dict:  # noqa: ANN001
    """Train the small stream + ``mean`` encoder with :func:`train_step` (per-batch seeds as ``sicot train``); the last epoch's metrics."""
    import time

    import torch
    from torch import nn

    from encoders import create_encoder
    from sicot_cli.data.dataset import open_prepared
    from sicot_cli.data.loader import BatchLoader, epoch_seed
    from sicot_cli.evaluate import evaluate_model
    from sicot_cli.model import SICoT
    from sicot_cli.train import step_forward, train_step

    cfg = recipe.train
    p = open_prepared(data)
    torch.manual_seed(cfg.seed)
    s = p.image_size
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * ((s + 3) // 4) ** 2, 128),
        nn.ReLU(),
    )
    model = SICoT(net, 128, p.num_classes)
    with torch.random.fork_rng(devices=[]):
        model.attach_encoder(create_encoder("mean", vectors=torch.from_numpy(p.vectors), out_dim=128))
    if cfg.classifier_dtype == "bfloat16":  # as sicot_cli.train does
        model.classifier.to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    forward = step_forward(model, cfg, False)
    loader = BatchLoader(p, cfg.batch_size, 0, p.n_train, shuffle=True, seed=cfg.seed, drop_last=True)
    device = torch.device("cpu")
    seconds = 0.0
    for epoch in range(cfg.epochs):
        model.train()
        t0 = time.perf_counter()
        for i, batch in enumerate(loader.epoch(epoch)):
            train_step(
                model,
                forward,
                opt,
                batch,
                device,
                cfg,
                torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch, 1 + i)),
            )
        seconds += time.perf_counter() - t0
        sched.step()
    metrics = evaluate_model(model, p, device, recipe).scalars()
    return {
        **metrics,
        "train_images_per_s": len(loader) * cfg.batch_size * cfg.epochs / seconds,
        "epoch_seconds": seconds / cfg.epochs,
        "run": run_name,
    }


def summary_row(results: dict, config: tuple[float, str], seeds: list[int]) -> dict:
    """One (rate, dtype)'s mean ± std over seeds, and its paired differences to the exact fp32 softmax
    (``*_diff``) and, for bf16, to fp32 at the same rate (``*_diff_fp32``)."""
    from sicot_cli.report import mean_std, paired_t

    got = results[config]
    row: dict = {"rate": config[0], "classifier_dtype": config[1]}
    for k in ("top1", "tail_top1", "train_images_per_s"):
        row[k] = mean_std([got[s][k] for s in seeds if got[s][k] is not None])
    for k in ("top1", "tail_top1"):
        for key, other in (
            (f"{k}_diff", results[(1.0, "float32")]),
            (f"{k}_diff_fp32", results.get((config[0], "float32"))),
        ):
            if other is None or (key.endswith("fp32") and config[1] == "float32"):
                continue
            both = [(got[s][k], other[s][k]) for s in seeds if got[s][k] is not None and other[s][k] is not None]
            diffs = [a - b for a, b in both]
            row[key] = {
                "mean": float(np.mean(diffs)) if diffs else None,
                "per_seed": diffs,
                "p": paired_t([a for a, _ in both], [b for _, b in both]) if got is not other else None,
            }
    return row


def label(config: tuple[float, str]) -> str:
    """``0.1`` or ``0.1 bf16``: a (rate, classifier dtype) as the table and the result file name it."""
    return f"{config[0]:g}" + ("" if config[1] == "float32" else " bf16")


def train_all(args, configs, seeds, base, data, name, console) -> dict:  # noqa: ANN001
    """Train (or reuse) every (rate, dtype) x seed; ``(rate, dtype) -> seed -> final test scores``."""
    from sicot_cli import runs
    from sicot_cli.config import load_recipe
    from sicot_cli.train import train

    results: dict[tuple[float, str], dict[int, dict]] = {}
    for seed in seeds:
        for rate, dtype in configs:
            recipe = load_recipe(
                args.recipe,
                [
                    *base,
                    *args.overrides,
                    f"train.seed={seed}",
                    f"train.class_sample_rate={rate}",
                    f"train.classifier_dtype={dtype}",
                    "train.device=cpu",
                ],
            )
            stream = "tiny-mean" if args.tiny_backbone else recipe.model.encoder
            suffix = "" if dtype == "float32" else "-bf16"
            run_dir = Path(args.runs_dir) / f"{name}-{stream}-r{rate:g}{suffix}-s{seed}"
            if args.tiny_backbone:
                final = tiny_run(recipe, data or Path(recipe.data.out), run_dir.name)
            else:
                result = train(recipe, run_dir, resume=run_dir.exists(), data=data)
                final = runs.read_summary(result.run_dir)["final"]  # the test split, scored once at the end
            results.setdefault((rate, dtype), {})[seed] = {
                k: final.get(k) for k in ("top1", "tail_top1", "head_top1", "train_images_per_s", "epoch_seconds")
            }
            console.print(
                f"{name} rate {label((rate, dtype))} seed {seed}: top-1 {final['top1']:.2f}, "
                f"tail top-1 {final.get('tail_top1')}"
            )
    return results


def main(argv: list[str] | None = None) -> dict:
    import torch
    from rich.console import Console
    from rich.table import Table

    from benchmarks.common import benchmark_parser, count, parse, positive_int, start, write_results
    from sicot_cli.config import load_recipe

    ap = benchmark_parser("class_sampling", __doc__)
    ap.add_argument("--recipe", default=None, help="a recipe whose prepared file exists")
    ap.add_argument(
        "--many-classes",
        type=count,
        default=0,
        help="build the synthetic many-class set with this many classes instead",
    )
    ap.add_argument("--image-size", type=positive_int, default=16)
    ap.add_argument("--max-per-class", type=positive_int, default=40)
    ap.add_argument(
        "--tiny-backbone",
        action="store_true",
        help="the small stream + mean encoder instead of the recipe's model (see above)",
    )
    ap.add_argument("--rates", default="1,0.3,0.1")
    ap.add_argument(
        "--dtypes",
        default="float32",
        help="comma-separated train.classifier_dtype values; every (rate, dtype) is paired against (1, float32), "
        "and a bfloat16 one also against float32 at its rate (bfloat16 needs a rate < 1: rate 1 is skipped)",
    )
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs-dir", default="runs/class-sampling")
    ap.add_argument("overrides", nargs="*", help="recipe overrides (section.key=value)")
    args = parse(ap, argv)
    if bool(args.recipe) == bool(args.many_classes):
        ap.error("give --recipe or --many-classes")
    rates = [float(r) for r in args.rates.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    dtypes = [d for d in args.dtypes.split(",") if d]
    if 1.0 not in rates:
        ap.error("--rates must include 1 (the exact reference)")
    if "float32" not in dtypes or any(d not in ("float32", "bfloat16") for d in dtypes):
        ap.error("--dtypes: float32 (the reference) and optionally bfloat16")
    configs = [(rate, dtype) for dtype in dtypes for rate in rates if dtype == "float32" or rate < 1]
    ref = (1.0, "float32")
    torch.set_num_threads(1)
    start()
    base: list[str] = []
    data = None
    if args.many_classes:
        base, data = many_class_data(
            Path(args.runs_dir) / "data", args.many_classes, args.image_size, args.max_per_class
        )
    probe = load_recipe(args.recipe, [*base, *args.overrides])
    name = f"many{args.many_classes}" if args.many_classes else probe.name
    console = Console()
    results = train_all(args, configs, seeds, base, data, name, console)
    model_name = (
        "tiny stream, encoder mean" if args.tiny_backbone else f"{probe.model.backbone}, encoder {probe.model.encoder}"
    )
    table = Table(title=f"class sampling, {name} ({model_name}, {probe.train.epochs} epochs, seeds {args.seeds})")
    for col in (
        "rate (classifier dtype)",
        "top-1",
        "tail top-1",
        "Δ top-1 vs exact (p)",
        "Δ tail vs exact (p)",
        *(["Δ top-1 vs fp32 at the rate (p)", "Δ tail vs fp32 at the rate (p)"] if "bfloat16" in dtypes else []),
        "train img/s",
    ):
        table.add_column(col, justify="right")
    summary = []
    for config in configs:
        row = summary_row(results, config, seeds)
        summary.append(row)

        def fmt(ms: tuple) -> str:
            return "-" if ms[0] is None else f"{ms[0]:.2f} ± {ms[1] or 0:.2f}"

        def diff(d: dict | None, config: tuple = config) -> str:
            return (
                "-"
                if d is None or config == ref or d["mean"] is None
                else f"{d['mean']:+.2f} (p={d['p']:.3f})"
                if d["p"] is not None and not math.isnan(d["p"])
                else f"{d['mean']:+.2f} (p undefined: equal differences)"
            )

        table.add_row(
            label(config),
            fmt(row["top1"]),
            fmt(row["tail_top1"]),
            diff(row["top1_diff"]),
            diff(row["tail_top1_diff"]),
            *([diff(row.get("top1_diff_fp32")), diff(row.get("tail_top1_diff_fp32"))] if "bfloat16" in dtypes else []),
            fmt(row["train_images_per_s"]),
        )
    console.print(table)
    result = {
        "benchmark": "class_sampling",
        "name": name,
        "tiny_backbone": args.tiny_backbone,
        "recipe": args.recipe,
        "overrides": args.overrides,
        "many_classes": args.many_classes,
        "rates": rates,
        "dtypes": dtypes,
        "seeds": seeds,
        "runs": {label(c): v for c, v in results.items()},
        "summary": summary,
    }
    console.print(f"wrote {write_results('class_sampling', name, result)}")
    return result


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
