"""How many CPU threads torch may use (``train.threads``, ``--threads``).

torch's default is one thread per core; two such jobs on one machine oversubscribe every core and
each runs several times slower (measured on a shared 2-core machine: an epoch of 4 s alone took
30-93 s next to other torch jobs). ``0`` means auto: the cores this process may run on (its CPU
affinity, which containers and ``taskset`` restrict), at most :data:`AUTO_MAX` (intra-op
parallelism gains little beyond that on the small kernels a CPU run meets). An ``OMP_NUM_THREADS``
set in the environment (torchrun sets 1 per rank) is the auto value instead.
"""

from __future__ import annotations

import os

AUTO_MAX = 8
MAX_THREADS = 1024  # the bound of train.threads


def check_threads(requested: int, flag: str = "--threads") -> None:
    """Refuse a thread count outside 0..MAX_THREADS (0 = auto) before torch sees it.

    Raises:
        SicotError: naming the flag and the value.
    """
    from sicot_cli.errors import SicotError

    if not 0 <= requested <= MAX_THREADS:
        raise SicotError(f"{flag} must be 0..{MAX_THREADS} (0 = auto), got {requested}")


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_threads(requested: int) -> int:
    """``requested``, or the auto value for 0."""
    if requested > 0:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    return max(1, min(AUTO_MAX, available_cores()))


def set_threads(requested: int) -> int:
    """Set torch's intra-op thread count; returns the number set (what a run records)."""
    import torch

    check_threads(requested)
    n = resolve_threads(requested)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
