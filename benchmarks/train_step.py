"""Co-training step vs baseline step, and the real loader vs batches already in memory.

Run ``python -m benchmarks.train_step [--quick] [--device cpu|cuda] [--backbone B] [--image-size S]
[--batch N] [--classes C]``. Every model runs the real training step
(:func:`sicot_cli.train.train_step`: uint8 to device, batched augmentation, forward, Eq. 1, backward,
SGD) on the SAME batches, timed in interleaved rounds; each ratio is the median of per-round ratios.
Goals: co-training with ``bilinear`` <= 1.05 x the baseline step (ResNet-50 setting), and an epoch
read by the real loader from the prepared HDF5 (streaming blocks, no RAM copy) <= 1.05 x the same
epoch on batches already in memory. Results: ``benchmarks/results/train_step-<device>.json``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import (
    benchmark_parser,
    interleaved_ms,
    model_setting,
    parse,
    peak_memory_gib,
    positive_int,
    start,
    write_results,
)
from encoders import list_encoders
from sicot_cli.config import load_recipe
from sicot_cli.data import dataset as ds
from sicot_cli.data.loader import Batch, BatchLoader
from sicot_cli.model import build_model
from sicot_cli.train import train_step

STEP_GOAL = 1.05
LOADER_GOAL = 1.05


def synthetic_prepared(
    path: Path,
    n: int,
    size: int,
    classes: int,
    vocab: int = 5000,
    dim: int = 300,
    words: int = 32,
    seed: int = 0,
    n_train: int | None = None,
) -> None:
    """A prepared file of random images and titles in the real layout (fast to make at any scale).

    Rows ``[0, n_train)`` are the training rows (default: all of them), the rest the test rows.
    """
    n_train = n if n_train is None else n_train
    rng = np.random.default_rng(seed)
    with ds.create(path, n, size, words) as f:
        step = ds.chunk_rows(size) * 8
        for i in range(0, n, step):
            m = min(step, n - i)
            f["images"][i : i + m] = rng.integers(0, 256, (m, 3, size, size), dtype=np.uint8)
        lengths = rng.integers(4, words + 1, n).astype(np.int32)
        tokens = rng.integers(1, vocab, (n, words)).astype(np.int32) * (np.arange(words)[None] < lengths[:, None])
        labels = rng.integers(0, classes, n)
        ds.write_arrays(
            f,
            labels=labels,
            tokens=tokens,
            lengths=lengths,
            ids=[str(i) for i in range(n)],
            titles=["t"] * n,
            class_names=[f"c{i}" for i in range(classes)],
            train_counts=np.bincount(labels[:n_train], minlength=classes),
            test_counts=np.bincount(labels[n_train:], minlength=classes),
            words=["<pad>", *(f"w{i}" for i in range(1, vocab))],
            word_counts=np.ones(vocab, np.int64),
            vectors=rng.normal(0, 0.1, (vocab, dim)).astype(np.float32),
        )
        ds.write_attrs(
            f,
            n_train=n_train,
            image_size=size,
            source="benchmark",
            head_threshold=100,
            recipe_json="{}",
            versions_json="{}",
        )


def loader_epochs(
    prepared: ds.Prepared,
    batch_size: int,
    n_epoch: int,
    step: Callable[[Batch], None],
    epochs: int,
    sync: Callable[[], None],
    pin_memory: bool = False,
    sampler: str = "instance",
) -> tuple[list[tuple[float, float]], float]:
    """Seconds of one epoch read by the real loader (HDF5 blocks, no RAM copy) and of the same
    epoch from batches already in memory, ``epochs`` times, alternating; and the median ratio.

    ``pin_memory``: page-locked batches, as ``sicot train`` uses on CUDA. ``sampler``: the rows an
    epoch draws (``train.sampler``); both loaders draw the same rows, the streaming one reads them
    block by block (sicot_cli.data.sampler).
    """
    mem = BatchLoader(
        prepared, batch_size, 0, n_epoch, shuffle=True, in_memory=True, drop_last=True, pin_memory=pin_memory,
        sampler=sampler,
    )  # fmt: skip
    disk = BatchLoader(
        prepared,
        batch_size,
        0,
        n_epoch,
        shuffle=True,
        in_memory=False,
        block_rows=max(batch_size, 1024),
        drop_last=True,
        pin_memory=pin_memory,
        sampler=sampler,
    )
    ram_batches = list(mem.epoch(0))

    def epoch_from(source: Iterable[Batch]) -> float:
        sync()
        t0 = time.perf_counter()
        for b in source:
            step(b)
        sync()
        return time.perf_counter() - t0

    epoch_from(ram_batches[:2])  # warm-up
    pairs = [(epoch_from(disk.epoch(e)), epoch_from(ram_batches)) for e in range(epochs)]
    return pairs, statistics.median(a / b for a, b in pairs)


def main(argv: list[str] | None = None) -> dict:
    parser = benchmark_parser(
        "train_step",
        __doc__,
        quick="small setting (< 1 min on a 2-core CPU)",
        device=True,
        batch="default: 256 on CUDA, 64 on CPU",
    )
    parser.add_argument("--classes", type=positive_int, default=1000)
    parser.add_argument("--encoders", default=",".join(list_encoders()))
    parser.add_argument(
        "--sampler",
        default="instance",
        choices=["instance", "class_balanced", "sqrt", "progressive"],
        help="train.sampler of the loader epochs",
    )
    args = parse(parser, argv)
    start()
    cuda = args.device.startswith("cuda")
    backbone, size = model_setting(args)
    batch_size = args.batch or (256 if cuda else 64)
    rounds, round_ms, batches = (3, 200.0, 2) if args.quick else (7, 1500.0, 4)
    device = torch.device(args.device)
    if cuda:
        torch.backends.cudnn.benchmark = True
    console = Console()
    recipe = load_recipe(None, [f"train.device={args.device}", f"train.batch_size={batch_size}"])
    cfg = recipe.train
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        n_epoch = batch_size * (4 if args.quick else 12)
        synthetic_prepared(path, n_epoch, size, args.classes)
        prepared = ds.open_prepared(path)
        mem = BatchLoader(prepared, batch_size, 0, n_epoch, shuffle=True, in_memory=True, drop_last=True)
        fixed: list[Batch] = list(mem.epoch(0))[:batches]

        def model_step(name: str):
            torch.manual_seed(0)
            model = build_model(backbone, args.classes, name, torch.from_numpy(prepared.vectors))
            model = model.to(memory_format=torch.channels_last).to(device).train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            gen = torch.Generator().manual_seed(0)
            state = {"i": 0}

            def step() -> None:
                train_step(model, model, opt, fixed[state["i"] % len(fixed)], device, cfg, gen)
                state["i"] += 1

            return model, opt, step

        names = ["none", *[e for e in args.encoders.split(",") if e]]
        steps = {}
        for name in names:
            steps[name] = model_step(name)[2]
        times = interleaved_ms(steps, warmup=2, rounds=rounds, round_ms=round_ms, sync=sync)
        ms = {k: statistics.median(v) for k, v in times.items()}
        ratios = {k: statistics.median(a / b for a, b in zip(v, times["none"], strict=True)) for k, v in times.items()}

        # Loader: one epoch streamed from disk vs the same epoch from batches already in memory.
        del steps
        model, opt, _ = model_step("bilinear")
        gen = torch.Generator().manual_seed(0)
        loader_pairs, loader_ratio = loader_epochs(
            prepared,
            batch_size,
            n_epoch,
            lambda b: train_step(model, model, opt, b, device, cfg, gen),
            2 if args.quick else 3,
            sync,
            pin_memory=cuda,
            sampler=args.sampler,
        )
        peak, peak_kind = peak_memory_gib(args.device)

    setting = f"{backbone} {size}px batch {batch_size} {args.classes} classes, {args.device}" + (
        " (quick)" if args.quick else ""
    )
    table = Table(title=f"training step: co-training vs baseline ({setting})")
    for col in ("model", "ms/step", "img/s", "x baseline"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name in names:
        table.add_row(
            "baseline (no encoder)" if name == "none" else f"co-training, {name}",
            f"{ms[name]:.1f}",
            f"{batch_size * 1000 / ms[name]:,.0f}",
            f"{ratios[name]:.3f}",
        )
    console.print(table)
    lt = Table(title=f"epoch time: real loader (HDF5 blocks) vs batches in memory, {args.sampler} sampler")
    for col in ("epoch", "loader s", "in-memory s", "ratio"):
        lt.add_column(col, justify="right")
    for i, (a, b) in enumerate(loader_pairs):
        lt.add_row(str(i), f"{a:.2f}", f"{b:.2f}", f"{a / b:.3f}")
    console.print(lt)
    step_met = ratios.get("bilinear", 0.0) <= STEP_GOAL
    loader_met = loader_ratio <= LOADER_GOAL
    if "bilinear" in ratios:
        console.print(
            f"goal: bilinear step <= {STEP_GOAL} x baseline: "
            + ("[green]met[/]" if step_met else "[red]not met[/]")
            + f" ({ratios['bilinear']:.3f}; the goal is stated for ResNet-50)"
        )
    console.print(
        f"goal: loader epoch <= {LOADER_GOAL} x in-memory epoch: "
        + ("[green]met[/]" if loader_met else "[red]not met[/]")
        + f" ({loader_ratio:.3f})"
    )
    result = {
        "benchmark": "train_step",
        "quick": args.quick,
        "setting": {
            "backbone": backbone,
            "image_size": size,
            "batch": batch_size,
            "classes": args.classes,
            "rounds": rounds,
            "sampler": args.sampler,
        },
        "steps": [
            {
                "model": k,
                "ms_per_step": ms[k],
                "images_per_s": batch_size * 1000 / ms[k],
                "ratio_to_baseline": ratios[k],
                "rounds_ms": times[k],
            }
            for k in names
        ],
        "loader": {"epochs": [{"loader_s": a, "in_memory_s": b} for a, b in loader_pairs], "ratio": loader_ratio},
        "peak_memory_gib": peak,
        "peak_memory_kind": peak_kind,
        "goals": {
            "bilinear_step_max_ratio": STEP_GOAL,
            "bilinear_met": step_met,
            "loader_max_ratio": LOADER_GOAL,
            "loader_met": loader_met,
        },
    }
    console.print(
        f"wrote {write_results('train_step' + ('' if args.sampler == 'instance' else '-' + args.sampler), args.device, result)}"
    )
    return result


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
