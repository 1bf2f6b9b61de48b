"""``python -m benchmarks all [--quick] [--device cpu|cuda] [--threads N]``: the whole suite.

``python -m benchmarks NAME [options]`` runs one benchmark (the same as ``python -m benchmarks.NAME``).
``all`` runs every benchmark of :data:`BENCHMARKS`, each in its own process (its peak memory, its
threads and its cuDNN state are its own, and one failure does not stop the rest), then prints a
summary of the goals. Results go to ``benchmarks/results/<name>-<device>.json``, or to the folder
``$SICOT_BENCH_RESULTS`` names.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, RESULTS_ENV

# The suite, in the order `all` runs it. A benchmark is a module `benchmarks.<name>` with a
# `main(argv)` that takes --quick (and --device unless it sets USES_DEVICE = False); adding one
# is one line here.
BENCHMARKS = [
    "prepare",
    "format2",
    "encoders",
    "train_step",
    "evaluate",
    "gpu_step",
    "sharded_fc",
    "serve",
    "report_scale",
]


def goals(result: object, prefix: str = "", verdicts: bool = False) -> dict[str, bool]:
    """Every goal verdict in a result, by its path: booleans under a key named ``met`` or ending in
    ``_met`` (or inside a table so named, like ``goals_met``)."""
    found: dict[str, bool] = {}
    if isinstance(result, dict):
        for key, value in result.items():
            where = f"{prefix}.{key}" if prefix else str(key)
            named = verdicts or key == "met" or str(key).endswith("_met")
            if isinstance(value, bool):
                if named:
                    found[where] = value
            elif isinstance(value, (dict, list)) and key not in ("environment", "profiles", "profile"):
                found.update(goals(value, where, named and isinstance(value, dict)))
    elif isinstance(result, list):
        for i, value in enumerate(result):
            found.update(goals(value, f"{prefix}[{i}]"))
    return found


def run_all(quick: bool, device: str | None, threads: int | None, only: list[str]) -> int:
    """Run the benchmarks one process each; print a summary; return the exit status."""
    env = dict(os.environ)
    if threads:
        # torch reads these at start: on a shared machine one thread per process is steadier.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    folder = Path(env[RESULTS_ENV]) if env.get(RESULTS_ENV) else RESULTS_DIR
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for name in only:
        module = importlib.import_module(f"benchmarks.{name}")
        uses_device = getattr(module, "USES_DEVICE", True)
        argv = (["--quick"] if quick else []) + (["--device", device] if uses_device else [])
        path = folder / f"{name}-{device if uses_device else 'cpu'}.json"
        before = path.stat().st_mtime_ns if path.exists() else None
        print(f"\n=== {name}: python -m benchmarks.{name} {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *argv], env=env)
        seconds = time.perf_counter() - t0
        if rc == 0 and (not path.exists() or path.stat().st_mtime_ns == before):
            print(f"{name}: exited 0 but did not write {path}", file=sys.stderr)
            rc = 1
        verdicts = goals(json.loads(path.read_text())) if rc == 0 else {}
        rows.append((name, rc, seconds, path, verdicts))
    print("\n=== summary")
    for name, rc, seconds, path, verdicts in rows:
        status = "ok" if rc == 0 else f"FAILED (exit {rc})"
        met = sum(verdicts.values())
        print(f"{name:12s} {status:18s} {seconds:7.1f} s  goals met {met}/{len(verdicts)}  {path if rc == 0 else ''}")
        for goal, ok in verdicts.items():
            if not ok:
                print(f"{'':12s} not met: {goal}")
    return 0 if all(rc == 0 for _, rc, *_ in rows) else 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in BENCHMARKS:
        importlib.import_module(f"benchmarks.{argv[0]}").main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument(
        "what", choices=["all"], help=f"`all`, or one of: {', '.join(BENCHMARKS)} (followed by its own options)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="every benchmark's quick mode (< 1 min each on a 2-core CPU)"
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="default: each benchmark's own (cuda when available)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per benchmark (default: torch's; 1 is steadier on a shared CPU)",
    )
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of the suite")
    args = parser.parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    unknown = [n for n in only if n not in BENCHMARKS]
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return run_all(args.quick, args.device, args.threads, only)


if __name__ == "__main__":
    sys.exit(main())
