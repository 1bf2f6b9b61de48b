"""What every benchmark shares: the common options, interleaved timing, profile tables, the
environment record, atomic results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# ``python -m benchmarks all`` runs each benchmark in its own process; this variable sends their
# results elsewhere (the slow test uses it so a test run never replaces the recorded results).
RESULTS_ENV = "SICOT_BENCH_RESULTS"


def _load_average() -> list[float]:
    """The 1/5/15-minute load averages: on a shared machine they say how noisy a timing was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not available on this platform
        return []


# What the machine looked like when the benchmark began (reset by start()).
_START: dict[str, object] = {"load_average": _load_average(), "perf": time.perf_counter()}


def start() -> None:
    """Mark the start of a benchmark: its load average and clock go into the results."""
    _START.update(load_average=_load_average(), perf=time.perf_counter())


PROFILE_MODES = ("auto", "always", "never")


def benchmark_parser(
    name: str,
    doc: str | None,
    *,
    quick: str | None = None,
    device: bool = False,
    profile: str | None = None,
    batch: str | None = None,
) -> argparse.ArgumentParser:
    """The parser of ``python -m benchmarks.<name>`` with the options benchmarks share; each adds its own.

    Args:
        name: the module's name (the ``prog``).
        doc: the module's docstring (its first line is the description).
        quick: ``--quick``'s help (what quick mode does), or None for no ``--quick``.
        device: add ``--device cpu|cuda`` (default cuda when available; :func:`parse` refuses cuda without it).
        profile: ``--profile auto|always|never``'s help (what is profiled), or None for no ``--profile``.
        batch: ``--batch``'s help (its defaults): also adds ``--backbone`` and ``--image-size``, whose
            defaults :func:`default_model` gives (the options of the training/evaluation step benchmarks).
    """
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=(doc or "").split("\n")[0])
    if quick is not None:
        parser.add_argument("--quick", action="store_true", help=quick)
    if device:
        import torch

        parser.add_argument(
            "--device",
            choices=["cpu", "cuda"],
            default="cuda" if torch.cuda.is_available() else "cpu",
            help="where to run (default: cuda when available)",
        )
    if batch is not None:
        parser.add_argument(
            "--backbone", default=None, help="torchvision model (default: resnet50 on CUDA, resnet18 on CPU)"
        )
        parser.add_argument(
            "--image-size", type=positive_int, default=None, help="default: 224 on CUDA, 64 on CPU (32 quick)"
        )
        parser.add_argument("--batch", type=positive_int, default=None, help=batch)
    if profile is not None:
        parser.add_argument("--profile", choices=PROFILE_MODES, default="auto", help=profile)
    return parser


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 written with digits 0-9 (a count, a size, a number of rounds)."""
    if not re.fullmatch(r"\s*[0-9]+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return int(text)


def count(text: str) -> int:
    """An argparse type: an integer >= 0 written with digits 0-9 (0 meaning "the default" where the help says so)."""
    if not re.fullmatch(r"\s*[0-9]+\s*", text):
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return int(text)


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1."""
    return [positive_int(t) for t in text.split(",")]


def cli(main: Callable[[], object]) -> None:
    """Run a benchmark's ``main`` from the command line: a user error (sicot's, a missing or unreadable
    file, an unknown name) is one ``error:`` line and exit 2, as in ``sicot`` itself, not a traceback."""
    from sicot_cli.errors import SicotError

    try:
        result = main()
    except SicotError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.filename is None:
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    if isinstance(result, int) and not isinstance(result, bool):
        sys.exit(result)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, refusing ``--device cuda`` on a machine without CUDA and a
    ``--backbone`` torchvision does not have."""
    args = parser.parse_args(argv)
    if getattr(args, "backbone", None) is not None:
        import torchvision

        if args.backbone not in torchvision.models.list_models(module=torchvision.models):
            parser.error(
                f"--backbone {args.backbone!r}: not a torchvision classification model (e.g. resnet18, resnet50)"
            )
    if getattr(args, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: CUDA is not available")
    return args


def default_model(device: str, quick: bool) -> tuple[str, int]:
    """Backbone and image size without ``--backbone``/``--image-size``: the paper's (ResNet-50 at
    224 px) on CUDA, ResNet-18 at 64 px (32 px quick) on CPU."""
    if device.startswith("cuda"):
        return "resnet50", 224
    return "resnet18", 32 if quick else 64


def model_setting(args: argparse.Namespace) -> tuple[str, int]:
    """``--backbone`` and ``--image-size`` as given, else :func:`default_model`'s."""
    backbone, size = default_model(args.device, args.quick)
    return args.backbone or backbone, args.image_size or size


def wants_profile(mode: str, met: bool) -> bool:
    """Whether ``--profile`` asks for a profile of a step whose goal is (not) ``met``."""
    return mode == "always" or (mode == "auto" and not met)


def peak_memory_gib(device: str) -> tuple[float, str]:
    """Peak memory so far and what it measures.

    On CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, since the last peak reset); on CPU:
    the process's peak resident set size (``getrusage``; everything the process ever held).
    """
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(torch.device(device)) / 2**30, "cuda_max_memory_allocated"
    import resource

    # ru_maxrss is in KiB on Linux (bytes on macOS).
    scale = 1 if platform.system() == "Darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30, "process_peak_rss"


def interleaved_ms(
    steps: dict[str, Callable[[], None]],
    warmup: int,
    rounds: int,
    round_ms: float,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Milliseconds per call of each function, one entry per timed round.

    Rounds are interleaved (each round times every function once) so a slow spell of a shared
    machine hits all of them alike; within a round a function runs as many calls as fit in about
    ``round_ms`` (at least one), sized from its last warm-up call.
    """
    reps: dict[str, int] = {}
    for name, fn in steps.items():
        last = 1.0
        for _ in range(max(warmup, 1)):
            t0 = time.perf_counter()
            fn()
            sync()
            last = (time.perf_counter() - t0) * 1000.0
        reps[name] = max(1, round(round_ms / max(last, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1000.0 / reps[name])
    return times


def profile_step(fn: Callable[[], None], steps: int, device: str, rows: int = 15) -> tuple[str, dict[str, float]]:
    """``torch.profiler`` key_averages of ``steps`` calls of ``fn``: the ops that dominate a step.

    Returns:
        The top-``rows`` table (sorted by self device time on CUDA, self CPU time on CPU), and
        every op's self time in milliseconds per step (to compare two steps op by op).
    """
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    fn()  # warm: the first call after another model's step pays allocator and cache misses
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    per_op = {e.key: getattr(e, key) / 1000.0 / steps for e in averages if getattr(e, key) > 0}
    return averages.table(sort_by=key, row_limit=rows, max_name_column_width=48), per_op


def op_deltas(subject: dict[str, float], reference: dict[str, float], rows: int = 10) -> list[dict[str, float | str]]:
    """The ops whose self time per step grows most from ``reference`` to ``subject`` (ms)."""
    deltas = [
        {
            "op": op,
            "subject_ms": subject.get(op, 0.0),
            "reference_ms": reference.get(op, 0.0),
            "delta_ms": subject.get(op, 0.0) - reference.get(op, 0.0),
        }
        for op in set(subject) | set(reference)
    ]
    deltas.sort(key=lambda d: -float(d["delta_ms"]))
    return [{k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()} for d in deltas[:rows]]


def compare_profiles(
    subject: str, reference: str, profiles: dict[str, tuple[str, dict[str, float]]]
) -> dict[str, object]:
    """The stored comparison of two profiled steps (:func:`profile_step` results by name): both
    tables and the ops that grow most from ``reference`` to ``subject``."""
    return {
        "subject": subject,
        "reference": reference,
        "subject_table": profiles[subject][0],
        "reference_table": profiles[reference][0],
        "top_op_deltas": op_deltas(profiles[subject][1], profiles[reference][1]),
    }


def print_profile(console: Console, profile: dict, per: str = "step", goal: str | None = None) -> None:
    """Print a :func:`compare_profiles` record: the subject's ops by self time, then the ops that grow most.

    Args:
        console: where the tables go.
        profile: the record.
        per: what one profiled call is ("step", "pass"), for the units.
        goal: the goal the profile explains, when a benchmark has several.
    """
    from rich.table import Table

    subject, reference = profile["subject"], profile["reference"]
    console.print(f"\nprofile{f' ({goal})' if goal else ''}: {subject}, ops by self time per {per}")
    print(profile["subject_table"])  # plain print: rich would re-wrap the profiler's fixed-width table
    table = Table(title=f"ops that grow most from {reference} to {subject} (ms per {per})")
    for col in ("op", subject, reference, "delta"):
        table.add_column(col, justify="left" if col == "op" else "right")
    for d in profile["top_op_deltas"]:
        table.add_row(str(d["op"]), f"{d['subject_ms']:.2f}", f"{d['reference_ms']:.2f}", f"{d['delta_ms']:+.2f}")
    console.print(table)


def _torchvision_version() -> str | None:
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision.__version__


def environment(device: str) -> dict[str, object]:
    """Where and with what a result was measured."""
    import torch

    env: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _torchvision_version(),
        "machine": platform.machine(),
        "load_average_start": _START["load_average"],
        "load_average_end": _load_average(),
        "seconds": round(time.perf_counter() - float(_START["perf"]), 1),  # type: ignore[arg-type]
        "argv": sys.argv[1:],  # the options it ran with (``python -m benchmarks.<name>`` + these)
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    return env


def write_results(name: str, device: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name>-<device>.json`` atomically; returns the path.

    The folder is ``$SICOT_BENCH_RESULTS`` when set, else :data:`RESULTS_DIR`.
    """
    folder = Path(os.environ[RESULTS_ENV]) if os.environ.get(RESULTS_ENV) else RESULTS_DIR
    path = folder / f"{name}-{device.split(':')[0]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"environment": environment(device), "benchmark": name, **payload}, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
