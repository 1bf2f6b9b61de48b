"""What every benchmark shares: interleaved timing, the environment record, atomic results."""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def interleaved_ms(steps: dict[str, Callable[[], None]], warmup: int, rounds: int, round_ms: float, sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
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
        "machine": platform.machine(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_results(name: str, device: str, payload: dict) -> Path:
    """Write ``benchmarks/results/<name>-<device>.json`` atomically; returns the path."""
    path = RESULTS_DIR / f"{name}-{device.split(':')[0]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"environment": environment(device), **payload}, f, indent=2)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
