"""Evaluation images/s: ``evaluate_model`` against a plain forward loop over the same images.

Run ``python -m benchmarks.evaluate [--quick] [--device cpu|cuda] [--backbone B] [--image-size S]
[--batch N] [--images N] [--classes C]``. A synthetic prepared file holds the test rows; three
passes over them are timed in interleaved rounds:

- ``evaluate (in memory)``: :func:`sicot_cli.evaluate.evaluate_model` as ``sicot train`` calls it
  after every epoch when the images fit in RAM (reads the test block, uint8 to the device,
  normalise, bf16 autocast on CUDA, softmax top-k back to the host, then the metrics);
- ``evaluate (streaming)``: the same with the loader streaming HDF5 blocks;
- ``plain forward``: the reference, the same model's ``logits`` on the same images already
  normalised on the device, nothing else.

Goal (ours; the issue sets none for evaluation): evaluate in memory >= 0.9 x the plain forward's
images/s. When it is not met, a ``torch.profiler`` table of both and the ops that grow most are
printed and stored. Results: ``benchmarks/results/evaluate-<device>.json``.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from benchmarks.common import (
    benchmark_parser,
    compare_profiles,
    interleaved_ms,
    model_setting,
    parse,
    positive_int,
    print_profile,
    profile_step,
    start,
    wants_profile,
    write_results,
)
from benchmarks.gpu_step import stage
from benchmarks.train_step import synthetic_prepared
from sicot_cli.config import load_recipe
from sicot_cli.data import dataset as ds
from sicot_cli.data.loader import BatchLoader
from sicot_cli.evaluate import evaluate_model
from sicot_cli.model import build_model

GOAL = 0.9
PLAIN = "plain forward"
IN_MEMORY = "evaluate (in memory)"
STREAMING = "evaluate (streaming)"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table and write the JSON results."""
    parser = benchmark_parser(
        "evaluate",
        __doc__,
        quick="fewer, smaller images (< 1 min on a 2-core CPU)",
        device=True,
        profile="profile when the goal is not met (auto)",
        batch="evaluation batch (default: 512 on CUDA, 128 on CPU)",
    )
    parser.add_argument(
        "--images", type=positive_int, default=None, help="test images (default: 8192 on CUDA, 512 on CPU, 256 quick)"
    )
    parser.add_argument("--classes", type=positive_int, default=1000)
    args = parse(parser, argv)
    start()
    cuda = args.device == "cuda"
    backbone, size = model_setting(args)
    batch = args.batch or (512 if cuda else 128)
    n_test = args.images or (8192 if cuda else (256 if args.quick else 512))
    rounds = 3 if args.quick else 5
    device = torch.device(args.device)
    if cuda:
        torch.backends.cudnn.benchmark = True
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    recipe = load_recipe(None, [f"train.device={args.device}", f"train.eval_batch_size={batch}"])
    console = Console()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        n_train = batch  # a few training rows: only their counts are read (head/tail split)
        synthetic_prepared(path, n_train + n_test, size, args.classes, n_train=n_train)
        prepared = ds.open_prepared(path)
        torch.manual_seed(0)
        model = build_model(backbone, args.classes, "none", torch.from_numpy(prepared.vectors))
        model = model.to(memory_format=torch.channels_last).to(device).eval()
        test = BatchLoader(prepared, batch, n_train, prepared.n, shuffle=False, in_memory=True)
        staged = [x for x, _ in stage(list(test.epoch(0)), device)]
        amp = recipe.train.amp and cuda
        seen: dict[str, float] = {}

        @torch.no_grad()
        def plain() -> None:
            for x in staged:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    model.logits(x)

        def evaluate(in_memory: bool) -> None:
            result = evaluate_model(model, prepared, device, recipe, in_memory=in_memory)
            seen["images"] = len(result.labels)
            seen["loop_images_per_s"] = result.images_per_s

        steps = {PLAIN: plain, IN_MEMORY: lambda: evaluate(True), STREAMING: lambda: evaluate(False)}
        times = interleaved_ms(steps, warmup=1, rounds=rounds, round_ms=1.0, sync=sync)
        if seen["images"] != n_test:  # evaluate_model must have scored every test row
            raise RuntimeError(f"evaluate_model scored {seen['images']} of {n_test} test images")
        ms = {k: statistics.median(v) for k, v in times.items()}
        ratios = {k: statistics.median(p / t for p, t in zip(times[PLAIN], v, strict=True)) for k, v in times.items()}
        met = ratios[IN_MEMORY] >= GOAL
        profile = None
        if wants_profile(args.profile, met):
            profile = compare_profiles(
                IN_MEMORY,
                PLAIN,
                {
                    IN_MEMORY: profile_step(lambda: evaluate(True), 1, args.device),
                    PLAIN: profile_step(plain, 1, args.device),
                },
            )

    setting = f"{backbone} {size}px, {n_test} test images, batch {batch}, {args.classes} classes, {args.device}" + (
        " (quick)" if args.quick else ""
    )
    table = Table(title=f"evaluation: evaluate_model vs a plain forward loop ({setting})")
    for col in ("pass", "s/pass", "img/s", "x plain forward"):
        table.add_column(col, justify="left" if col == "pass" else "right")
    for name in steps:
        table.add_row(name, f"{ms[name] / 1000:.2f}", f"{n_test * 1000 / ms[name]:,.0f}", f"{ratios[name]:.3f}")
    console.print(table)
    console.print(
        f"goal: evaluate (in memory) >= {GOAL} x plain forward: "
        + ("[green]met[/]" if met else "[red]not met[/]")
        + f" ({ratios[IN_MEMORY]:.3f})"
    )
    if profile is not None:
        print_profile(console, profile, per="pass")
    result = {
        "benchmark": "evaluate",
        "quick": args.quick,
        "setting": {
            "backbone": backbone,
            "image_size": size,
            "batch": batch,
            "images": n_test,
            "classes": args.classes,
            "rounds": rounds,
        },
        "passes": [
            {
                "pass": k,
                "seconds_per_pass": ms[k] / 1000,
                "images_per_s": n_test * 1000 / ms[k],
                "ratio_to_plain": ratios[k],
                "rounds_ms": times[k],
            }
            for k in steps
        ],
        "evaluate_loop_images_per_s": seen["loop_images_per_s"],  # evaluate_model's own figure (loop only, last call)
        "goal": {"min_ratio_to_plain": GOAL, "ratio": ratios[IN_MEMORY], "met": met},
        "profile": profile,
    }
    console.print(f"wrote {write_results('evaluate', args.device, result)}")
    return result


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
