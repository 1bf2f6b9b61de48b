"""Reporting at many classes: what ``prepare``'s noise-filter report and ``sicot report`` cost as
the class count grows, each against the way it was done before, measured in the same run.

Run ``python -m benchmarks.report_scale [--quick] [--classes N] [--threads N]``. Three parts, at N
classes (default 50,000; 5,000 quick):

- ``label information``: the mutual information of every removed word with the label (prepare's
  "removed words most tied to a label"), :func:`sicot_cli.data.vocab.label_information` in closed
  form against the reference, a loop over every label per word (the code before it). Interleaved
  rounds; the values must agree to 1e-9. Goal: >= 10x faster.
- ``bootstrap``: :func:`sicot_cli.report.bootstrap_ci` over one test image per class (20,000 at
  least), peak memory
  (``tracemalloc``, which sees numpy's buffers) with its batches against one batch of every
  resample (the code before it). The intervals must be identical. Goal: <= 0.5x the memory.
- ``Fig. 6``: :func:`sicot_cli.figures.fig6_distribution` (one step outline per group) against the
  reference, one bar per class (the code before it): seconds (after a warm-up figure), then the
  ``tracemalloc`` peak in calls of their own; one round each (the reference takes half a minute at
  50,000 classes). Goal: >= 5x faster.

Results: ``benchmarks/results/report_scale-cpu.json``.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from benchmarks.common import benchmark_parser, interleaved_ms, parse, positive_int, start, write_results

USES_DEVICE = False  # CPU work: `python -m benchmarks all` passes it no --device
GOALS = {
    "label information": ("min_speedup", 10.0),
    "bootstrap": ("max_memory_ratio", 0.5),
    "Fig. 6": ("min_speedup", 5.0),
}


def label_information_per_label(word_labels: Counter[str], label_counts: Counter[str], n_titles: int) -> float:
    """The reference: the same mutual information as a loop over every label (the code before the closed form)."""
    n_w = sum(word_labels.values())
    if n_w == 0 or n_w == n_titles:
        return 0.0
    mi = 0.0
    for label, n_c in label_counts.items():
        both = word_labels.get(label, 0)
        for joint, marginal in ((both, n_w), (n_c - both, n_titles - n_w)):
            if joint:
                mi += joint / n_titles * math.log2(joint * n_titles / (marginal * n_c))
    return mi


def fig6_per_class_bars(train_counts: np.ndarray, head_threshold: int, path: Path) -> None:
    """The reference: Fig. 6 with one bar object per class (the code before the step outlines)."""
    from sicot_cli.figures import _plt, _save

    plt = _plt()
    counts = np.sort(np.asarray(train_counts))[::-1]
    head = counts >= head_threshold
    fig, ax = plt.subplots(figsize=(7, 3.2))
    x = np.arange(len(counts))
    ax.bar(x[head], counts[head], color="#d62728", width=1.0, label="head")
    ax.bar(x[~head], counts[~head], color="#2ca02c", width=1.0, label="tail")
    ax.legend()
    _save(fig, path)


def _quietly(fn: Callable[..., object], *args: object) -> None:
    """``fn(*args)`` without matplotlib's warning that ``legend(loc="best")`` is slow (the reference's own)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        fn(*args)


def _long_tail(classes: int, rng: np.random.Generator) -> np.ndarray:
    """Training images per class, Zipf-like: a few classes with thousands, most with a handful."""
    return np.maximum(1, (3000 / np.arange(1, classes + 1) ** 0.8).astype(int) + rng.integers(0, 3, classes))


def _label_information(classes: int, words: int, rounds: int, rng: np.random.Generator) -> dict:
    from sicot_cli.data.vocab import label_information

    counts = _long_tail(classes, rng)
    label_counts = Counter({f"c{i}": int(n) for i, n in enumerate(counts)})
    n_titles, labelled = int(counts.sum()), int(counts.sum())
    # each removed word occurs in the titles of a few to a few hundred classes
    stats = []
    for _ in range(words):
        held = rng.choice(classes, size=int(rng.integers(2, 300)), replace=False)
        stats.append(Counter({f"c{c}": int(rng.integers(1, counts[c] + 1)) for c in held}))
    ours = [label_information(s, label_counts, n_titles, labelled) for s in stats]
    ref = [label_information_per_label(s, label_counts, n_titles) for s in stats]
    worst = max(abs(a - b) for a, b in zip(ours, ref, strict=True))
    steps: dict[str, Callable[[], None]] = {
        "closed form": lambda: [label_information(s, label_counts, n_titles, labelled) for s in stats],
        "per label (before)": lambda: [label_information_per_label(s, label_counts, n_titles) for s in stats],
    }
    times = interleaved_ms(steps, warmup=0, rounds=rounds, round_ms=0.0)
    ms = {k: statistics.median(v) for k, v in times.items()}
    return {
        "words": words,
        "seconds": {k: v / 1000 for k, v in ms.items()},
        "rounds_ms": times,
        "speedup": ms["per label (before)"] / ms["closed form"],
        "max_abs_difference_bits": worst,
        "agree": worst <= 1e-9,
    }


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _peak_bytes(fn: Callable[[], object]) -> tuple[object, int]:
    """``fn()``'s value and its ``tracemalloc`` peak in bytes (tracing slows Python's allocations:
    time is measured in a call of its own)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        value = fn()
        return value, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _bootstrap(images: int, rng: np.random.Generator) -> dict:
    from sicot_cli import report

    diff = rng.choice([-1.0, 0.0, 0.0, 1.0], size=images)  # per image: hit by one model only, by both or neither
    ours, ours_bytes = _peak_bytes(lambda: report.bootstrap_ci(diff))
    batch = report.BOOTSTRAP_BATCH_VALUES
    report.BOOTSTRAP_BATCH_VALUES = report.BOOTSTRAP * len(diff)  # every resample in one batch: the code before
    try:
        ref, ref_bytes = _peak_bytes(lambda: report.bootstrap_ci(diff))
    finally:
        report.BOOTSTRAP_BATCH_VALUES = batch
    return {
        "images": len(diff),
        "peak_mib": {"batched": ours_bytes / 2**20, "one batch (before)": ref_bytes / 2**20},
        "memory_ratio": ours_bytes / ref_bytes,
        "interval": list(ours),  # type: ignore[arg-type]
        "agree": ours == ref,
    }


def _fig6(classes: int, rng: np.random.Generator) -> dict:
    from sicot_cli.figures import fig6_distribution

    counts = _long_tail(classes, rng)
    with tempfile.TemporaryDirectory() as tmp:
        ours = lambda: fig6_distribution(counts, 100, "bench", Path(tmp) / "a.png")  # noqa: E731
        ref = lambda: _quietly(fig6_per_class_bars, counts, 100, Path(tmp) / "b.png")  # noqa: E731
        fig6_distribution(counts[:10], 100, "warm-up", Path(tmp) / "w.png")  # matplotlib's import and font cache
        ours_s, ref_s = _seconds(ours), _seconds(ref)
        ours_bytes, ref_bytes = _peak_bytes(ours)[1], _peak_bytes(ref)[1]
    return {
        "seconds": {"step outlines": ours_s, "per-class bars (before)": ref_s},
        "peak_mib": {"step outlines": ours_bytes / 2**20, "per-class bars (before)": ref_bytes / 2**20},
        "speedup": ref_s / ours_s,
        "memory_ratio": ours_bytes / ref_bytes,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table and write the JSON results."""
    parser = benchmark_parser("report_scale", __doc__, quick="5,000 classes, 50 words, 2 rounds")
    parser.add_argument("--classes", type=positive_int, default=None, help="default 50,000 (5,000 quick)")
    parser.add_argument("--words", type=positive_int, default=None, help="removed words scored (default 200; 50 quick)")
    parser.add_argument(
        "--images",
        type=positive_int,
        default=None,
        help="test images of the bootstrap (default: classes, 20,000 at least)",
    )
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    args = parse(parser, argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start()
    classes = args.classes or (5_000 if args.quick else 50_000)
    words = args.words or (50 if args.quick else 200)
    rng = np.random.default_rng(0)
    parts = {
        "label information": _label_information(classes, words, 2 if args.quick else 3, rng),
        "bootstrap": _bootstrap(args.images or max(classes, 20_000), rng),  # test images: one per class at least
        "Fig. 6": _fig6(classes, rng),
    }
    goals = {}
    for name, (kind, bound) in GOALS.items():
        value = parts[name]["speedup" if kind == "min_speedup" else "memory_ratio"]
        met = (value >= bound if kind == "min_speedup" else value <= bound) and parts[name].get("agree", True)
        goals[name] = {kind: bound, "value": value, "met": bool(met)}

    console = Console()
    table = Table(title=f"reporting at {classes:,} classes{' (quick)' if args.quick else ''}")
    for col in ("part", "ours", "before (same run)", "ratio", "goal"):
        table.add_column(col, justify="left" if col in ("part", "goal") else "right")
    li, bs, f6 = parts["label information"], parts["bootstrap"], parts["Fig. 6"]

    def verdict(name: str) -> str:
        g = goals[name]
        return f"{next(k for k in g if k not in ('value', 'met'))} {GOALS[name][1]}: " + (
            "[green]met[/]" if g["met"] else "[red]NOT met[/]"
        )

    table.add_row(
        f"label information, {words} words (s)",
        f"{li['seconds']['closed form']:.3f}",
        f"{li['seconds']['per label (before)']:.3f}",
        f"{li['speedup']:.1f}x faster",
        verdict("label information") + ("" if li["agree"] else " (values differ)"),
    )
    table.add_row(
        f"bootstrap CI, {bs['images']:,} images, peak MiB",
        f"{bs['peak_mib']['batched']:.0f}",
        f"{bs['peak_mib']['one batch (before)']:.0f}",
        f"{bs['memory_ratio']:.3f}",
        verdict("bootstrap") + ("" if bs["agree"] else " (intervals differ)"),
    )
    table.add_row(
        "Fig. 6 (s)",
        f"{f6['seconds']['step outlines']:.2f}",
        f"{f6['seconds']['per-class bars (before)']:.2f}",
        f"{f6['speedup']:.1f}x faster",
        verdict("Fig. 6"),
    )
    table.add_row(
        "Fig. 6, peak MiB",
        f"{f6['peak_mib']['step outlines']:.0f}",
        f"{f6['peak_mib']['per-class bars (before)']:.0f}",
        f"{f6['memory_ratio']:.3f}",
        "",
    )
    console.print(table)
    result = {
        "benchmark": "report_scale",
        "quick": args.quick,
        "setting": {"classes": classes, "words": words, "images": parts["bootstrap"]["images"]},
        "parts": parts,
        "goals": goals,
    }
    console.print(f"wrote {write_results('report_scale', 'cpu', result)}")
    return result


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
