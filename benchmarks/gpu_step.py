"""The paper's scale: sicot's training step against torchvision's plain ResNet-50 step, one run.

Run ``python -m benchmarks.gpu_step [--quick] [--device cpu|cuda] [--backbone B] [--image-size S]
[--batch N] [--classes 1000,100000] [--encoder E]``. On CUDA the defaults are the paper's setting:
ResNet-50 at 224 px, batch 256, synthetic data of 1,000 and 100,000 classes. On CPU that setting
takes minutes per step, so the CPU defaults are a tiny one (ResNet-18, 64 px, batch 32; ``--quick``:
32 px, batch 16, 1,000 and 10,000 classes) that exercises the same code.

For each class count three steps are timed in interleaved rounds on the same batches:

- ``torchvision``: the reference, no sicot code: ``torchvision.models.<backbone>(num_classes=C)``,
  channels_last, bf16 autocast on CUDA, SGD; its input is already normalised float on the device,
  so it is the cost of the model alone;
- ``baseline``: :func:`sicot_cli.train.train_step` with no encoder (uint8 batch to the device,
  batched crop+flip there, normalise, forward, Eq. 1, backward, SGD);
- ``co-training``: the same step with a text encoder (``bilinear`` by default); Eq. 1 scores x_v
  and x_m in one GEMM (:func:`sicot_cli.model.score_cat`);
- ``baseline@R`` and ``co-training@R`` (``--sample-rate R``, default 0.1; 1 leaves them out): the
  same steps with ``train.class_sample_rate = R`` (the softmax over the batch's classes and a
  uniform sample of the others, Partial FC style; ``sicot_cli/classifier_step.py``).

``--models`` keeps some of them (e.g. ``baseline,co-training`` at a million classes, where every
model holds its own classifier, gradient and momentum: 6 GiB each at 512 dims) and ``--no-loader``
skips the loader epochs (a fourth model).

Also: the loader ratio (an epoch streamed from the prepared HDF5 vs the same epoch from RAM, with
the co-training step), and peak memory per model (CUDA: ``max_memory_allocated`` of each model
alone; CPU: the process's peak RSS). Goals: baseline img/s >= 0.9 x torchvision's, co-training
>= 0.95 x baseline, and sampled co-training >= 0.95 x sampled baseline (the same rate). A goal that is not met gets a ``torch.profiler`` table of both steps and the
ops that grow most, printed and stored in ``benchmarks/results/gpu_step-<device>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from benchmarks.common import (
    benchmark_parser,
    compare_profiles,
    default_model,
    interleaved_ms,
    parse,
    peak_memory_gib,
    positive_ints,
    print_profile,
    profile_step,
    start,
    wants_profile,
    write_results,
)
from benchmarks.train_step import loader_epochs, synthetic_prepared
from sicot_cli.config import TrainConfig, load_recipe
from sicot_cli.data import dataset as ds
from sicot_cli.data.loader import Batch, BatchLoader
from sicot_cli.errors import SicotError
from sicot_cli.model import MEAN, STD, build_model
from sicot_cli.train import step_forward, train_step

BASELINE_GOAL = 0.9  # sicot baseline img/s / torchvision img/s
COTRAIN_GOAL = 0.95  # co-training img/s / baseline img/s (exact, and both sampled at one rate)
EXACT = ("torchvision", "baseline", "co-training")
SAMPLED = ("baseline@", "co-training@")  # + the rate
# goal name -> (subject, reference, minimum ratio or None for a figure without a goal); the ratio is
# reference ms / subject ms (throughput), the median over interleaved rounds.
PAIRS = {
    "baseline_vs_torchvision": ("baseline", "torchvision", BASELINE_GOAL),
    "cotraining_vs_baseline": ("co-training", "baseline", COTRAIN_GOAL),
    "sampled_cotraining_vs_sampled_baseline": ("co-training@", "baseline@", COTRAIN_GOAL),
    "sampled_baseline_vs_baseline": ("baseline@", "baseline", None),
    "sampled_cotraining_vs_baseline": ("co-training@", "baseline", None),
}


def model_names(rate: float) -> list[str]:
    """Every model of a run: the exact ones, and the sampled ones when the rate is below 1."""
    return [*EXACT, *(f"{m}{rate:g}" for m in SAMPLED)] if rate < 1 else list(EXACT)


def resolve(name: str, rate: float) -> str:
    """A pair's name (``baseline@``) as the model's (``baseline@0.1``)."""
    return f"{name}{rate:g}" if name.endswith("@") else name


def settings(args: argparse.Namespace) -> dict:
    """The setting to run: the paper's on CUDA, a tiny one on CPU; explicit flags win."""
    cuda = args.device.startswith("cuda")
    backbone, size = default_model(args.device, args.quick)
    if cuda:
        default = {"backbone": backbone, "image_size": size, "batch": 256, "classes": "1000,100000"}
        rounds, round_ms, batches, epoch_batches = (3, 500.0, 2, 4) if args.quick else (7, 2000.0, 4, 12)
    elif args.quick:
        # 10,000 classes, not 100,000: on CPU the 100k classifier alone takes seconds per step.
        default = {"backbone": backbone, "image_size": size, "batch": 16, "classes": "1000,10000"}
        rounds, round_ms, batches, epoch_batches = 3, 150.0, 2, 3
    else:
        default = {"backbone": backbone, "image_size": size, "batch": 32, "classes": "1000,100000"}
        rounds, round_ms, batches, epoch_batches = 5, 1500.0, 3, 4
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in default.items()}
    if isinstance(chosen["classes"], str):  # the default
        chosen["classes"] = [int(c) for c in chosen["classes"].split(",")]
    models = model_names(args.sample_rate)
    if args.models:
        wanted = [resolve(m.strip(), args.sample_rate) for m in args.models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in models]
        if unknown or not wanted:  # dropped without a word: an empty table, and a result file of nothing
            raise SicotError(f"--models: unknown {', '.join(unknown) or 'empty list'} (known: {', '.join(models)})")
        models = [m for m in models if m in wanted]
    return {
        **chosen,
        "encoder": args.encoder,
        "rounds": rounds,
        "round_ms": round_ms,
        "batches": batches,
        "epoch_batches": epoch_batches,
        "sample_rate": args.sample_rate,
        "models": models,
        "loader": not args.no_loader,
    }


def torchvision_step(
    backbone: str, classes: int, staged: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device, cfg: TrainConfig
) -> Callable[[], None]:
    """torchvision's plain training step on batches already normalised on the device."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(backbone, weights=None, num_classes=classes)
    net = net.to(memory_format=torch.channels_last).to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    amp = device.type == "cuda"
    state = {"i": 0}

    def step() -> None:
        x, y = staged[state["i"] % len(staged)]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(x)
        F.cross_entropy(out.float(), y).backward()
        opt.step()

    return step


def sicot_step(
    backbone: str,
    classes: int,
    encoder: str,
    vectors: torch.Tensor,
    fixed: list[Batch],
    device: torch.device,
    cfg: TrainConfig,
) -> tuple[Callable[[Batch], None], Callable[[], None]]:
    """sicot's training step (``encoder="none"``: the baseline): on a given batch, and cycling ``fixed``."""
    torch.manual_seed(0)
    model = build_model(backbone, classes, encoder, vectors)
    model = model.to(memory_format=torch.channels_last).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(0)
    state = {"i": 0}
    forward = step_forward(model, cfg, False)

    def on(batch: Batch) -> None:
        train_step(model, forward, opt, batch, device, cfg, gen)

    def step() -> None:
        on(fixed[state["i"] % len(fixed)])
        state["i"] += 1

    return on, step


def stage(fixed: list[Batch], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The reference's input: the same images as normalised channels_last float on the device."""
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1) * 255.0
    out = []
    for b in fixed:
        x = ((b.images.to(device).float() - mean) / std).contiguous(memory_format=torch.channels_last)
        out.append((x, b.labels.to(device)))
    return out


def measure(
    classes: int, s: dict, device: torch.device, cfg: TrainConfig, quick: bool, profile: str, console: Console
) -> dict:
    """Every figure of one class count."""
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    batch = s["batch"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.h5"
        n_epoch = batch * s["epoch_batches"]
        synthetic_prepared(path, n_epoch, s["image_size"], classes)
        prepared = ds.open_prepared(path)
        vectors = torch.from_numpy(prepared.vectors)
        mem = BatchLoader(prepared, batch, 0, n_epoch, shuffle=True, in_memory=True, drop_last=True, pin_memory=cuda)
        fixed = list(mem.epoch(0))[: s["batches"]]
        staged = stage(fixed, device)

        models = s["models"]

        def build(name: str) -> Callable[[], None]:
            if name == "torchvision":
                return torchvision_step(s["backbone"], classes, staged, device, cfg)
            rate = float(name.split("@")[1]) if "@" in name else 1.0
            encoder = "none" if name.startswith("baseline") else s["encoder"]
            return sicot_step(
                s["backbone"],
                classes,
                encoder,
                vectors,
                fixed,
                device,
                dataclasses.replace(cfg, class_sample_rate=rate),
            )[1]

        # Peak memory of each model alone (CUDA); on CPU only the process's peak RSS exists.
        peaks: dict[str, float | None] = dict.fromkeys(models)
        if cuda:
            for name in models:
                gc.collect()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                fn = build(name)
                fn()
                fn()
                sync()
                peaks[name] = (torch.cuda.max_memory_allocated(device) - before) / 2**30
                del fn
            gc.collect()
            torch.cuda.empty_cache()

        steps = {name: build(name) for name in models}
        times = interleaved_ms(steps, warmup=2, rounds=s["rounds"], round_ms=s["round_ms"], sync=sync)
        ms = {k: statistics.median(v) for k, v in times.items()}
        # Throughput ratios (higher is better): the median over rounds of reference ms / subject ms.
        pairs = {g: (resolve(a, s["sample_rate"]), resolve(b, s["sample_rate"])) for g, (a, b, _) in PAIRS.items()}
        pairs = {g: (a, b) for g, (a, b) in pairs.items() if a in times and b in times}
        per_round = {g: [r / x for x, r in zip(times[a], times[b], strict=True)] for g, (a, b) in pairs.items()}
        speed = {k: statistics.median(v) for k, v in per_round.items()}
        spread = {k: [min(v), max(v)] for k, v in per_round.items()}  # how noisy the rounds were
        met = {g: speed[g] >= PAIRS[g][2] for g in pairs if PAIRS[g][2] is not None}

        profiles: dict[str, dict] = {}
        wanted = [g for g in met if wants_profile(profile, met[g])]
        tables: dict[str, tuple[str, dict[str, float]]] = {}
        for goal in wanted:
            for name in pairs[goal]:
                if name not in tables:
                    tables[name] = profile_step(steps[name], 1 if quick else 3, str(device))
            profiles[goal] = compare_profiles(*pairs[goal], tables)
        del steps

        loader_pairs, loader_ratio = [], None
        if s["loader"]:
            on, _ = sicot_step(s["backbone"], classes, s["encoder"], vectors, fixed, device, cfg)
            loader_pairs, loader_ratio = loader_epochs(
                prepared, batch, n_epoch, on, 2 if quick else 3, sync, pin_memory=cuda
            )
            del on
        process_peak, peak_kind = peak_memory_gib("cpu") if not cuda else (None, "cuda_max_memory_allocated")

    return {
        "classes": classes,
        "steps": [
            {
                "model": k,
                "ms_per_step": ms[k],
                "images_per_s": batch * 1000 / ms[k],
                "peak_memory_gib": peaks[k],
                "rounds_ms": times[k],
            }
            for k in models
        ],
        "ratios": speed,
        "ratio_ranges": spread,
        "pairs": pairs,
        "goals_met": met,
        "loader": {"epochs": [{"loader_s": a, "in_memory_s": b} for a, b in loader_pairs], "ratio": loader_ratio},
        "process_peak_rss_gib": process_peak,
        "peak_memory_kind": peak_kind,
        "profiles": profiles,
    }


def report(console: Console, r: dict, setting: str) -> None:
    table = Table(title=f"training step, {r['classes']:,} classes ({setting})")
    for col in ("model", "ms/step", "img/s", "ratio", "peak GiB"):
        table.add_column(col, justify="left" if col == "model" else "right")
    ratio: dict[str, list[str]] = {}
    for goal, value in r["ratios"].items():
        subject, reference = r["pairs"][goal]
        ratio.setdefault(subject, []).append(f"{value:.3f} x {reference}")
    for row in r["steps"]:
        peak = row["peak_memory_gib"]
        shown = "; ".join(ratio.get(row["model"], [])) or ("1.000 (reference)" if row["model"] == "torchvision" else "")
        table.add_row(
            row["model"],
            f"{row['ms_per_step']:.1f}",
            f"{row['images_per_s']:,.0f}",
            shown,
            "" if peak is None else f"{peak:.2f}",
        )
    console.print(table)
    if r["process_peak_rss_gib"] is not None:
        console.print(
            f"process peak RSS so far: {r['process_peak_rss_gib']:.2f} GiB (CPU: per-model peaks are not separable)"
        )
    if r["loader"]["ratio"] is not None:
        console.print(f"loader epoch / in-memory epoch (co-training): {r['loader']['ratio']:.3f}")
    for goal, met in r["goals_met"].items():
        value = r["ratios"][goal]
        lo, hi = r["ratio_ranges"][goal]
        verdict = "[green]met[/]" if met else "[red]not met[/]"
        subject, reference = r["pairs"][goal]
        console.print(
            f"goal: {subject} img/s >= {PAIRS[goal][2]} x {reference}: {verdict} ({value:.3f}; rounds {lo:.3f}..{hi:.3f})"
        )
    for goal, p in r["profiles"].items():
        print_profile(console, p, goal=goal)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the tables and write the JSON results."""
    parser = benchmark_parser(
        "gpu_step",
        __doc__,
        quick="fewer rounds (< 1 min on a 2-core CPU)",
        device=True,
        profile="profile a step when its goal is not met (auto)",
        batch="default: 256 on CUDA, 32 on CPU (16 quick)",
    )
    parser.add_argument(
        "--classes", type=positive_ints, default=None, help="comma-separated class counts (default: 1000,100000)"
    )
    parser.add_argument("--encoder", default="bilinear", help="the co-training encoder")
    parser.add_argument(
        "--sample-rate", type=float, default=0.1, help="train.class_sample_rate of the sampled models (1: none)"
    )
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated subset of torchvision,baseline,co-training,baseline@,co-training@",
    )
    parser.add_argument("--no-loader", action="store_true", help="skip the loader epochs")
    args = parse(parser, argv)
    if not 0 < args.sample_rate <= 1:
        parser.error(f"--sample-rate must be in (0, 1], got {args.sample_rate}")
    start()
    s = settings(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    cfg = load_recipe(None, [f"train.device={args.device}", f"train.batch_size={s['batch']}"]).train
    console = Console()
    setting = f"{s['backbone']} {s['image_size']}px batch {s['batch']}, {args.device}" + (
        " (quick)" if args.quick else ""
    )
    results = []
    for classes in s["classes"]:
        r = measure(classes, s, device, cfg, args.quick, args.profile, console)
        report(console, r, setting)
        results.append(r)
    result = {
        "benchmark": "gpu_step",
        "quick": args.quick,
        "setting": {
            k: s[k]
            for k in (
                "backbone",
                "image_size",
                "batch",
                "classes",
                "encoder",
                "rounds",
                "round_ms",
                "sample_rate",
                "models",
                "loader",
            )
        },
        "results": results,
        "goals": {
            "baseline_vs_torchvision_min": BASELINE_GOAL,
            "cotraining_vs_baseline_min": COTRAIN_GOAL,
            "sampled_cotraining_vs_sampled_baseline_min": COTRAIN_GOAL,
        },
    }
    console.print(f"wrote {write_results('gpu_step', args.device, result)}")
    return result


if __name__ == "__main__":
    from benchmarks.common import cli

    cli(main)
