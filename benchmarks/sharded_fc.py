"""The class-sharded shared classifier on gloo ranks (CPU): memory per rank and step time.

Two measurements, each from one run:

1. **Scale.** ``--classes`` (default 1,000,000) x ``--dim`` (512) fp32 classifier with SGD momentum,
   sharded over ``--world`` (2) gloo ranks: each rank's classifier memory (weight + bias, their
   gradients and momentum buffers, and with sampling the step's fp32 copies of the sampled rows,
   measured from the tensors after the steps) against the unsharded
   size of the same tensors (goal: 1/world of it, up to one class of rounding), and the step time.
   One step is SICoT's (``sicot_cli.classifier_step.eq1_from_streams``): x_v and x_m of the global
   batch all-gathered in one collective, one GEMM for both, the exact sharded cross-entropy over
   both, backward, SGD. With ``--sample-rate R`` < 1 (default 0.1) the same step with class
   sampling is measured too: per rank, the softmax runs over its part of the sampled classes and
   only the sampled rows get a gradient (``[sample, dim]``) and an update.
2. **Scaling.** At ``--compare-classes`` (100,000), small enough for one process, the same step on
   1 rank (unsharded size) and on ``--world`` ranks: the step-time ratio (the classifier's work is
   split, the all-gather and all-reduces are added).

Every rank uses one thread, so 2 ranks use the 2 cores of the CI machine. Run:
``python -m benchmarks.sharded_fc`` (``--quick``: 100,000 / 20,000 classes, under a minute;
``--settings exact,sampled,sampled-bf16``: the settings measured at ``--classes``, ``sampled-bf16``
with ``train.classifier_dtype = "bfloat16"`` storage; leave ``exact`` out where its full gradient
does not fit).
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

USES_DEVICE = False


def _worker(
    rank: int,
    world: int,
    rendezvous: str,
    classes: int,
    dim: int,
    batch: int,
    steps: int,
    out: str,
    rate: float = 1.0,
    dtype: str = "float32",
) -> None:
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from sicot_cli.classifier_step import eq1_from_streams
    from sicot_cli.distributed import DistContext, ShardedLinear, shard_range

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        ctx = DistContext(rank, world)
        lo, hi = shard_range(classes, world, rank)
        torch.manual_seed(0)
        clf = ShardedLinear(dim, classes, lo, hi).to(getattr(torch, dtype))  # bf16: the rows path of every step
        opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        local = batch // world
        times = []
        model = SimpleNamespace(classifier=clf, mixed_trains_classifier=True)
        for step in range(steps + 1):  # step 0 is a warm-up (allocations)
            x_v = torch.randn(local, dim, generator=g, requires_grad=True)
            x_m = torch.randn(local, dim, generator=g, requires_grad=True)
            labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(step))[
                rank * local : (rank + 1) * local
            ]
            dist.barrier()
            t0 = time.perf_counter()
            loss, _, _, sampled = eq1_from_streams(
                model, x_v, x_m, labels, batch, 1.0, False, ctx, world > 1, rate, torch.Generator().manual_seed(step)
            )
            opt.zero_grad(set_to_none=False)
            loss.backward()
            opt.step()
            if sampled is not None:
                sampled.step(opt)
            dist.barrier()
            if step:
                times.append(time.perf_counter() - t0)
        grads = (  # sampled: the rows' fp32 leaves and their gradients
            [clf.weight.grad, clf.bias.grad]
            if sampled is None
            else [sampled.weight, sampled.bias, sampled.weight.grad, sampled.bias.grad]
        )
        tensors = [clf.weight, clf.bias, *grads, *(opt.state[p]["momentum_buffer"] for p in (clf.weight, clf.bias))]
        nbytes = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        Path(out, f"rank{rank}.txt").write_text(f"{nbytes} {rss} {statistics.median(times)} {float(loss.detach())}")
    finally:
        dist.destroy_process_group()


def measure(
    world: int, classes: int, dim: int, batch: int, steps: int, rate: float = 1.0, dtype: str = "float32"
) -> dict[str, float]:
    """Spawn ``world`` gloo ranks; per-rank classifier bytes, peak RSS and median step seconds."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _worker,
            args=(world, os.path.join(tmp, "rendezvous"), classes, dim, batch, steps, tmp, rate, dtype),
            nprocs=world,
            join=True,
        )
        rows = [Path(tmp, f"rank{r}.txt").read_text().split() for r in range(world)]
    return {
        "classifier_bytes_per_rank": max(int(r[0]) for r in rows),
        "peak_rss_bytes_per_rank": max(int(r[1]) for r in rows),
        "step_seconds": max(float(r[2]) for r in rows),
        "loss": float(rows[0][3]),
    }


def unsharded_bytes(classes: int, dim: int) -> int:
    """weight + bias, their gradients and momentum, fp32, in one process."""
    return 3 * 4 * (classes * dim + classes)


SETTINGS = {  # name -> (sampled?, classifier dtype)
    "exact": (False, "float32"),
    "sampled": (True, "float32"),
    "sampled-bf16": (True, "bfloat16"),
}


def _table(args, result: dict, settings: list[str]):  # noqa: ANN001, ANN202
    """The printed table of one run's result."""
    from rich.table import Table

    gib = 2.0**30
    full, scale, one, many = result["unsharded_bytes"], result["scale"], result["one"], result["many"]
    t = Table(
        title=f"sharded classifier, {args.world} gloo ranks x 1 thread, global batch {args.batch}", title_justify="left"
    )
    for col in ("setting", "classes x dim", "classifier GiB / rank", "vs unsharded", "peak RSS GiB / rank", "step s"):
        t.add_column(col)
    size = f"{args.classes:,} x {args.dim}"
    t.add_row("unsharded fp32 exact (size of)", size, f"{full / gib:.2f}", "1", "-", "-")
    for name, row in scale.items():
        sampled, dtype = SETTINGS[name]
        label = f"sharded, {args.world} ranks, " + (f"sampled {args.sample_rate:g}" if sampled else "exact")
        share = f"{row['fraction_of_unsharded']:.3f}"
        if name == "exact":
            share += f" (goal {1 / args.world:.3f}: {'met' if result['memory_met'] else 'NOT met'})"
        ratio = "" if name == settings[0] else f" ({row['step_ratio_to_first']:.2f} x {settings[0]})"
        t.add_row(
            f"{label}, {'bf16' if dtype == 'bfloat16' else 'fp32'}",
            size,
            f"{row['classifier_bytes_per_rank'] / gib:.2f}",
            share,
            f"{row['peak_rss_bytes_per_rank'] / gib:.2f}",
            f"{row['step_seconds']:.3f}{ratio}",
        )
    t.add_row(
        "1 rank, exact fp32",
        f"{args.compare_classes:,} x {args.dim}",
        f"{one['classifier_bytes_per_rank'] / gib:.3f}",
        "-",
        f"{one['peak_rss_bytes_per_rank'] / gib:.2f}",
        f"{one['step_seconds']:.3f}",
    )
    t.add_row(
        f"sharded, {args.world} ranks, exact fp32",
        f"{args.compare_classes:,} x {args.dim}",
        f"{many['classifier_bytes_per_rank'] / gib:.3f}",
        "-",
        f"{many['peak_rss_bytes_per_rank'] / gib:.2f}",
        f"{many['step_seconds']:.3f} ({result['scaling']['ratio']:.2f} x 1 rank)",
    )
    return t


def main(argv: list[str] | None = None) -> dict:
    from rich.console import Console

    from benchmarks.common import benchmark_parser, parse, positive_int, start, write_results

    ap = benchmark_parser("sharded_fc", __doc__, quick="100,000 / 20,000 classes (under a minute)")
    ap.add_argument("--classes", type=positive_int, default=1_000_000)
    ap.add_argument("--compare-classes", type=positive_int, default=100_000)
    ap.add_argument("--dim", type=positive_int, default=512)
    ap.add_argument("--world", type=positive_int, default=2)
    ap.add_argument("--batch", type=positive_int, default=64, help="global batch (features gathered from every rank)")
    ap.add_argument("--steps", type=positive_int, default=3)
    ap.add_argument("--sample-rate", type=float, default=0.1, help="class sampling rate of the sampled settings")
    ap.add_argument(
        "--settings",
        default="exact,sampled",
        help=f"comma-separated settings measured at --classes on --world ranks, of {', '.join(SETTINGS)} "
        "(-bf16: train.classifier_dtype = bfloat16). Leave exact out where its full-size gradient does not fit",
    )
    args = parse(ap, argv)
    if args.quick:
        args.classes, args.compare_classes, args.steps = 100_000, 20_000, 2
    settings = [x for x in args.settings.split(",") if x]
    if not settings or any(x not in SETTINGS for x in settings):
        ap.error(f"--settings: comma-separated names of {', '.join(SETTINGS)}, got {args.settings!r}")
    if not 0 < args.sample_rate < 1 and any(SETTINGS[x][0] for x in settings):
        ap.error(f"--sample-rate must be in (0, 1) for a sampled setting, got {args.sample_rate}")
    start()
    full = unsharded_bytes(args.classes, args.dim)
    scale = {}
    for name in settings:
        sampled, dtype = SETTINGS[name]
        got = measure(
            args.world, args.classes, args.dim, args.batch, args.steps, args.sample_rate if sampled else 1.0, dtype
        )
        scale[name] = {**got, "fraction_of_unsharded": got["classifier_bytes_per_rank"] / full}
    first = scale[settings[0]]["step_seconds"]
    for row in scale.values():
        row["step_ratio_to_first"] = row["step_seconds"] / first
    one = measure(1, args.compare_classes, args.dim, args.batch, args.steps)
    many = measure(args.world, args.compare_classes, args.dim, args.batch, args.steps)
    goal = (1 / args.world) * (1 + args.world / args.classes) + 1e-12  # the first shard holds one class more
    result = {
        "setting": vars(args),
        "classes": args.classes,
        "dim": args.dim,
        "world": args.world,
        "unsharded_bytes": full,
        "goal_fraction": 1 / args.world,
        "memory_met": scale["exact"]["fraction_of_unsharded"] <= goal if "exact" in scale else None,
        "scale": scale,
        "one": one,
        "many": many,
        "scaling": {
            "classes": args.compare_classes,
            "one_rank_step_seconds": one["step_seconds"],
            "sharded_step_seconds": many["step_seconds"],
            "ratio": many["step_seconds"] / one["step_seconds"],
            "one_rank_classifier_bytes": one["classifier_bytes_per_rank"],
            "sharded_classifier_bytes_per_rank": many["classifier_bytes_per_rank"],
        },
    }
    t = _table(args, result, settings)
    Console().print(t)
    Console().print(f"results: {write_results('sharded_fc', 'cpu', result)}")
    return result


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
