"""Format 2's writer: images encoded into JPEG shards, one machine's part or all of them (``prepare``).

The layout and the reader are :mod:`sicot_cli.data.jpegstore`; what calls this is
:func:`sicot_cli.data.prepare.prepare` (``--shard i/n`` writes :func:`part_shards` of the shards,
``--merge`` checks them with :func:`collect_shards`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sicot_cli.data.images import ImageSkip, load_image
from sicot_cli.data.jpegstore import ShardInfo, predates_digests, read_info, shard_name, write_shard
from sicot_cli.errors import SicotError
from sicot_cli.threads import worker_pool

WINDOW = 8  # shards encoded per process-pool map


def source_pixels(source: object, size: int, max_pixels: int) -> np.ndarray:
    """A row's image (a file path, or a synthetic item) -> ``[size, size, 3]`` uint8, its centre square.

    What both formats store (format 1 as it is, format 2 JPEG-encoded). Top-level: it runs in
    process pools.

    Raises:
        ImageSkip: the image cannot be used (the skip reason).
    """
    if isinstance(source, Path):
        return load_image(source, size, max_pixels)
    from sicot_cli.data.synthetic import render

    return render(source, size)  # type: ignore[arg-type]


def encode(job: tuple[object, int, int, int]) -> tuple[bytes, str] | str:
    """One image (a path, or a synthetic item) -> the JPEG bytes of its centre square at ``side`` and
    the digest of those pixels before encoding (:func:`pixel_digest`); a skip reason on failure."""
    source, side, max_pixels, quality = job
    try:
        hwc = source_pixels(source, side, max_pixels)
    except ImageSkip as e:
        return str(e)
    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, "JPEG", quality=quality)
    return buf.getvalue(), pixel_digest(hwc)


def pixel_digest(hwc: np.ndarray) -> str:
    """What says two rows hold the same picture (both formats' cross-split duplicate check): a
    128-bit blake2b of the decoded pixels, hex."""
    return hashlib.blake2b(np.ascontiguousarray(hwc).tobytes(), digest_size=16).hexdigest()


def part_shards(n_shards: int, part: tuple[int, int]) -> range:
    """The shards part ``i`` of ``n`` writes: near-equal contiguous runs (the loader's slice rule)."""
    i, n = part
    base, extra = divmod(n_shards, n)
    lo = i * base + min(i, extra)
    return range(lo, lo + base + (1 if i < extra else 0))


def run_shards(
    folder: Path, fingerprint: str, jobs: Sequence[tuple[object, int, int, int]], shard_rows: int,
    shards: range, workers: int, progress: Any,  # noqa: ANN401 - a Progress
) -> tuple[dict[int, ShardInfo], int]:  # fmt: skip
    """Encode and write ``shards`` (those not already complete); returns their records and how many were kept.

    One process pool encodes the rows of every missing shard in order, and each shard is written as
    soon as its last row is back, so an interrupted run loses at most the shards in flight.
    """
    folder.mkdir(parents=True, exist_ok=True)
    infos: dict[int, ShardInfo] = {}
    todo = []
    for k in shards:
        info = read_info(folder, k, fingerprint, _rows(jobs, k, shard_rows))
        if info is None:
            todo.append(k)
        else:
            infos[k] = info
    kept = len(infos)
    chunk = max(1, min(64, shard_rows // (workers * 4) or 1))
    with progress.task("encoding images (JPEG shards)", sum(_rows(jobs, k, shard_rows) for k in todo)) as task:
        with worker_pool(workers) if workers > 1 else contextlib.nullcontext() as pool_map:
            for w in range(0, len(todo), WINDOW):  # a window of shards at a time: bounded memory, few stalls
                window = todo[w : w + WINDOW]
                flat = [job for k in window for job in jobs[k * shard_rows : (k + 1) * shard_rows]]
                results = pool_map(encode, flat, chunk) if pool_map else map(encode, flat)
                for k in window:
                    got = [next(results) for _ in range(_rows(jobs, k, shard_rows))]
                    infos[k] = write_shard(folder, k, fingerprint, got)
                    task.advance(len(got))
    return infos, kept


def _rows(jobs: Sequence[object], k: int, shard_rows: int) -> int:
    return len(range(k * shard_rows, min((k + 1) * shard_rows, len(jobs))))


def collect_shards(folder: Path, fingerprint: str, n_rows: int, shard_rows: int) -> dict[int, ShardInfo]:
    """Every shard of the dataset, checked (``--merge``): missing or foreign shards are named with the part that writes them."""
    n_shards = -(-n_rows // shard_rows)
    infos, missing = {}, []
    for k in range(n_shards):
        info = read_info(folder, k, fingerprint, len(range(k * shard_rows, min((k + 1) * shard_rows, n_rows))))
        if info is None:
            missing.append(k)
        else:
            infos[k] = info
    if missing:
        shown = ", ".join(str(folder / shard_name(k)) for k in missing[:3])
        older = sum(predates_digests(folder, k) for k in missing)
        why = (
            f" ({older} written by an earlier sicot, without the pixel digests that the check for copies across "
            "splits reads)"
            if older
            else ""
        )
        raise SicotError(
            f"{shown}{' ...' if len(missing) > 3 else ''}: {len(missing)} of {n_shards} image shards missing, incomplete or "
            f"made from other rows or settings{why} (the parts must run with the same recipe and manifest): run the "
            "`sicot prepare --shard i/n` parts that write them (or prepare without --shard), then merge"
        )
    return infos
