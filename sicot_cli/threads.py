"""How many CPU threads torch may use (``train.threads``, ``--threads``), and the worker processes of ``prepare``.

torch's default is one thread per core; two such jobs on one machine oversubscribe every core and
each runs several times slower (measured on a shared 2-core machine: an epoch of 4 s alone took
30-93 s next to other torch jobs). ``0`` means auto: the cores this process may run on (its CPU
affinity, which containers and ``taskset`` restrict), at most :data:`AUTO_MAX` (intra-op
parallelism gains little beyond that on the small kernels a CPU run meets). An ``OMP_NUM_THREADS``
set in the environment (torchrun sets 1 per rank) is the auto value instead.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from sicot_cli.errors import SicotError
from sicot_cli.interrupts import STOP_SIGNALS

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
    if env.isascii() and env.isdigit() and int(env) > 0:
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


# --- worker processes (image decoding, JPEG encoding, tokenizing) ------------------------------

STOP_GRACE = 10.0  # seconds the workers get to finish the image in hand after Ctrl-C; then they are terminated
_stopping: Any = None  # in a worker: the pool's stop event (a multiprocessing.Event)


def _init_worker(stopping: Any, parent: int) -> None:  # noqa: ANN401 - a multiprocessing.Event
    """A worker ignores Ctrl-C and SIGTERM (the terminal, or ``kill`` of the job's process group,
    sends them to every process of the job): the parent stops the pool. It dies with its parent: a
    sicot killed outright (SIGKILL, the OOM killer) leaves no idle worker behind."""
    global _stopping
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # held back while the pool started
    _stopping = stopping
    die_with_parent(parent)


def loader_worker_init(parent: int, *_: object) -> None:
    """A DataLoader worker (format 2's image decoding): as a pool worker, it leaves Ctrl-C and
    SIGTERM to the parent, which stops the loader (a worker killed first was reported as a dead
    loader process instead of an interrupt), and it dies with its parent."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent(parent)


def die_with_parent(parent: int, *_: object) -> None:
    """Ask Linux to kill this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``, SIGKILL:
    workers ignore SIGTERM); if the parent ``parent`` is gone already, exit now. Elsewhere: nothing
    (the pool's own checks). Further arguments (a DataLoader's worker id) are ignored."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    if os.getppid() != parent:  # a fork server's child (start method "forkserver"), or the parent is gone
        if not os.path.exists(f"/proc/{parent}"):
            os._exit(1)
        return  # the pool's own checks: the signal would follow the fork server, not sicot
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # died between the check and the prctl
        os._exit(1)


def _call(fn: Callable[[Any], Any], item: Any) -> Any:  # noqa: ANN401
    """``fn(item)``, or nothing once the pool is stopping: the queued work drains at once."""
    if _stopping is not None and _stopping.is_set():
        return None
    return fn(item)


@contextmanager
def worker_pool(workers: int) -> Iterator[Callable[..., Iterator[Any]]]:
    """``workers`` processes (at most one per core); yields ``map(fn, items, chunksize)`` (results in order, ``fn`` a module-level function).

    Ctrl-C is the parent's alone: the workers ignore SIGINT (no traceback from each of them). When
    the block ends by an exception (KeyboardInterrupt included), the queued work is cancelled, the
    workers skip what they were sent and finish the item in hand (at most :data:`STOP_GRACE`
    seconds, or a second Ctrl-C; then they are terminated), and every worker has exited before the
    exception goes on: no orphan process, no worker killed while it sends a result (which could
    leave the pool's reader waiting forever at exit).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    cores = os.cpu_count() or 1
    if workers > cores:  # CPU-bound work: more processes than cores only add forks and memory
        import logging

        logging.getLogger(__name__).warning(
            "%d worker processes asked for, %d cores here: using %d", workers, cores, cores
        )
        workers = cores
    try:
        stopping = multiprocessing.Event()
        pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(stopping, os.getpid()))
    except OSError as e:  # their locks live in /dev/shm: read-only, or full (a container's 64 MB)
        raise SicotError(
            f"cannot start {workers} worker processes ({e.strerror or e}): they need a writable /dev/shm with room "
            "(in a container: `docker run --shm-size=1g`); or work in this process with data.workers = 1 (--workers 1)"
        ) from None
    try:
        _start_workers(pool)

        def run(fn: Callable[[Any], Any], items: Iterable[Any], chunksize: int = 1) -> Iterator[Any]:
            return pool.map(functools.partial(_call, fn), items, chunksize=chunksize)

        yield run
    except BaseException:
        stopping.set()
        _stop(pool)
        raise
    pool.shutdown()


def _start_workers(pool: Any) -> None:  # noqa: ANN401 - a ProcessPoolExecutor
    """Fork every worker with Ctrl-C held back, and deliver a Ctrl-C that came meanwhile afterwards.

    A forked worker has the parent's handler until its initializer runs, so SIGINT is blocked in
    this thread, and the children inherit the mask. Blocking is per thread, though: another thread
    of this process (a queue feeder, a progress bar) can take a terminal's SIGINT, and Python then
    raises KeyboardInterrupt here, between a fork and the pool's record of that child, which
    nobody would stop (measured: "left running" 1 run in 9). So the Python handler is swapped for
    one that only notes the signal, and the noted Ctrl-C is delivered once the pool knows its workers.
    """
    import threading

    noted: list[int] = []
    main = threading.current_thread() is threading.main_thread()  # signal.signal works there only
    previous = {s: signal.signal(s, lambda signum, _frame: noted.append(signum)) for s in STOP_SIGNALS} if main else {}
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        pool.submit(int).result()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if noted and callable(previous.get(noted[0])):  # Python's default SIGINT handler raises KeyboardInterrupt
        previous[noted[0]](noted[0], None)
    elif noted and previous.get(noted[0]) == signal.SIG_DFL:
        if noted[0] == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), noted[0])  # SIGTERM's default: end the process, now that the pool knows its workers


def _stop(pool: Any) -> None:  # noqa: ANN401 - a ProcessPoolExecutor
    """Cancel the queued work and wait for the workers (see :func:`worker_pool`); terminate them if they hang."""
    procs = list((pool._processes or {}).values())  # private: the only handle on the workers
    manager = pool._executor_manager_thread
    pool.shutdown(wait=False, cancel_futures=True)
    try:
        if manager is not None:
            manager.join(STOP_GRACE)
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
        pass
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(STOP_GRACE)
        if p.is_alive():
            p.kill()
            p.join()
