"""Batches from a prepared HDF5 file, in an order that depends only on (seed, epoch).

Random row reads from HDF5 are ~500x slower than contiguous ones (measured: ~1k images/s vs
~500k images/s), so the loader never fancy-indexes the file:

- in memory (``train.in_memory``: "yes", or "auto" when the images fit ``train.memory_limit_gb``):
  the training block is read once, contiguously, and each epoch is a full permutation;
- streaming: the rows are cut into blocks of ``train.block_rows`` contiguous rows; each epoch
  shuffles the block order, groups ``train.shuffle_blocks`` blocks into a buffer and permutes the
  rows within it. Each block is read with one contiguous slice.

The epoch's order is a pure function of the seed and the epoch, so the baseline and every encoder
see the same batches, and a run resumed in the middle of an epoch continues with the same batches.
Distributed (``rank``/``world``): every rank computes the same global batches and takes its own
contiguous slice of each (:func:`slice_range`), so N ranks together see
exactly the batches one process sees, and each rank reads only its rows.
Images stay uint8 until they reach the device (augmentation runs there, in batches).

Format 2 (JPEG shards, :mod:`sicot_cli.data.jpegstore`): a block is the part of a shard inside the
split, so the shuffle above reads each shard whole (its sha256 checked); each batch is decoded,
randomly cropped from the stored image (the crops format 1 takes on the device, drawn from the same
per-batch seed) and flipped in ``workers`` processes (a ``torch.utils.data.DataLoader`` over the
epoch's batches, in order), or in the reader thread when ``workers`` is 0.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from sicot_cli.data.augment import crop_flip_params
from sicot_cli.data.dataset import Prepared, rebuild_hint
from sicot_cli.data.jpegstore import Store, crop_boxes, decode_row
from sicot_cli.data.sampler import draw_rows
from sicot_cli.errors import SicotError
from sicot_cli.threads import loader_worker_init


def read_error(path: object, e: Exception) -> SicotError:
    """An HDF5 read failure in the middle of a job: the file changed or the disk failed, never a traceback."""
    return SicotError(
        f"{path}: cannot read the images ({str(e).splitlines()[0] if str(e) else type(e).__name__}): the file was damaged or the disk failed; "
        f"{rebuild_hint(Path(str(path)))}; an interrupted run resumes from its last checkpoint"
    )


def slice_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of ``n`` that ``rank`` holds: near-equal contiguous blocks, the first ones one larger.

    The data layer's rule, used by the loader for each global batch and by
    :func:`sicot_cli.distributed.shard_range` for the classes of a sharded classifier.
    """
    base, extra = divmod(n, world)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass
class Batch:
    """One batch, still on the CPU: uint8 images, title ids, labels and the dataset rows."""

    images: torch.Tensor  # [B, 3, S, S] uint8
    tokens: torch.Tensor  # [B, L] int64, L = longest title in the batch
    mask: torch.Tensor  # [B, L] bool
    labels: torch.Tensor  # [B] int64
    rows: np.ndarray  # [B] dataset rows
    offset: int = 0  # distributed: where this rank's slice starts in the global batch
    total: int = 0  # distributed: the global batch's size (0: this batch is the whole batch)
    augmented: bool = False  # cropped and flipped by the loader (format 2): the step does not augment again

    @property
    def global_size(self) -> int:
        return self.total or len(self.labels)


def epoch_seed(seed: int, epoch: int, salt: int = 0) -> int:
    """A well-mixed 63-bit seed for (seed, epoch, salt)."""
    return int(np.random.SeedSequence([seed, epoch, salt]).generate_state(1, np.uint64)[0] >> 1)


class BatchLoader:
    """Training or evaluation batches over the rows ``[start, stop)`` of a prepared file."""

    def __init__(
        self,
        prepared: Prepared,
        batch_size: int,
        start: int,
        stop: int,
        *,
        shuffle: bool,
        seed: int = 0,
        in_memory: bool = True,
        block_rows: int = 4096,
        shuffle_blocks: int = 4,
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
        prefetch: int = 2,
        pin_memory: bool = False,
        sampler: str = "instance",
        epochs: int = 1,
        workers: int = 0,
        crop: tuple[float, float] | None = None,
        rank_shards: bool = False,
    ) -> None:
        prepared.check_unchanged()  # a validation pass, or an epoch, reads the file again by its name
        self.p = prepared
        self.batch_size = batch_size
        self.start, self.stop = start, stop
        self.shuffle = shuffle
        self.seed = seed
        self.block_rows = max(1, block_rows)
        self.shuffle_blocks = max(1, shuffle_blocks)
        self.drop_last = drop_last
        self.rank, self.world = rank, world
        self.prefetch = prefetch
        self.pin_memory = pin_memory  # CUDA: page-locked batches, so the copies can be non-blocking
        self.sampler, self.epochs = sampler, epochs  # which rows an epoch draws (sicot_cli.data.sampler)
        self.workers = workers  # format 2: decoding processes
        self.crop = crop  # format 2, training: random resized crop scale (None: the whole image)
        self._ram: np.ndarray | None = None
        self._store: Store | None = prepared.store
        self._shards: dict[int, bytes] | None = None  # format 2 in memory: the split's shards
        # format 2 across ranks: each rank reads only its own shards (see _rank_plan)
        self.rank_shards = rank_shards and prepared.store is not None and world > 1 and shuffle
        if self.rank_shards and sampler != "instance":
            raise SicotError(f'train.rank_shards works with train.sampler = "instance", not {sampler!r}')
        if self._store is not None:
            self._starts = self._store.blocks(start, stop)
            if in_memory:
                shards = np.unique(self._store.shard[start:stop])
                self._shards = {int(k): self._store.read_shard(int(k)) for k in shards}
            return
        self._starts = np.arange(0, max(self.n, 0), self.block_rows, dtype=np.int64)
        if in_memory:
            try:
                with h5py.File(prepared.path, "r") as f:
                    self._ram = f["images"][start:stop]
            except (OSError, KeyError) as e:
                raise read_error(prepared.path, e) from None

    @property
    def n(self) -> int:
        return self.stop - self.start

    def __len__(self) -> int:
        """(Global) batches per epoch."""
        if self.rank_shards:
            return self._rank_steps()
        return max(self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size), 0)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's row order, relative to ``start`` (all ranks compute the same one)."""
        if not self.shuffle:
            return np.arange(self.n)
        rng = np.random.default_rng(epoch_seed(self.seed, epoch))
        if self.sampler != "instance":
            return self._drawn_order(rng, epoch)
        if self._ram is not None:
            return rng.permutation(self.n)
        return self._mix_blocks(rng, rng.permutation(len(self._starts)))

    def _mix_blocks(self, rng: np.random.Generator, blocks: np.ndarray | list[int]) -> np.ndarray:
        """The rows of ``blocks`` (in that order), ``shuffle_blocks`` blocks at a time permuted together."""
        bounds = np.r_[self._starts, self.n]
        parts = [
            rng.permutation(
                np.concatenate([np.arange(bounds[b], bounds[b + 1]) for b in blocks[g : g + self.shuffle_blocks]])
            )
            for g in range(0, len(blocks), self.shuffle_blocks)
        ]
        return np.concatenate(parts) if parts else np.arange(0)

    def _drawn_order(self, rng: np.random.Generator, epoch: int) -> np.ndarray:
        """A class-aware sampler's rows (drawn with replacement), ordered as an instance epoch is.

        In memory: a permutation of the drawn rows. Streaming: the drawn rows grouped by block, the
        blocks in a shuffled order, ``shuffle_blocks`` blocks per group permuted together, so each
        block holding a drawn row is read in one contiguous slice once per epoch.
        """
        labels = np.asarray(self.p.labels[self.start : self.stop])
        rows = draw_rows(self.sampler, labels, self.p.num_classes, rng, epoch, self.epochs)
        if self._ram is not None:
            return rng.permutation(rows)
        blocks = np.searchsorted(self._starts, rows, side="right") - 1
        order = rng.permutation(len(self._starts))
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        rows = rows[np.argsort(rank[blocks], kind="stable")]  # the drawn rows, block after block
        group = rank[blocks[np.argsort(rank[blocks], kind="stable")]] // self.shuffle_blocks
        cuts = np.flatnonzero(np.diff(group)) + 1
        return np.concatenate([rng.permutation(part) for part in np.split(rows, cuts)]) if len(rows) else rows

    def _rank_blocks(self, rank: int) -> list[int]:
        """``train.rank_shards``: the blocks (shard pieces) rank ``rank`` owns, every epoch the same."""
        return list(range(rank, len(self._starts), self.world))

    def _rank_steps(self) -> int:
        """Steps per epoch with rank-owned shards: as many as the rank with the fewest rows (per its slice) fills."""
        bounds = np.r_[self._starts, self.n]
        steps = []
        for r in range(self.world):
            rows = sum(int(bounds[b + 1] - bounds[b]) for b in self._rank_blocks(r))
            lo, hi = slice_range(self.batch_size, self.world, r)
            steps.append(rows // max(hi - lo, 1))
        return max(min(steps), 0)

    def _rank_plan(self, epoch: int) -> list[tuple[np.ndarray, int, int]]:
        """``train.rank_shards``: this rank's batches from its own shards only (no shard is read by two ranks).

        Rank r owns every world-th shard piece; each epoch it shuffles them as one process shuffles
        all (blocks in a seeded order, ``shuffle_blocks`` mixed) and fills its slice of each global
        batch from them. The global batch is the ranks' slices together: drawn like one process's
        batch, but not the same rows (the price of disjoint reads); the rows beyond the step count the
        smallest rank fills wait for the next epoch's order.
        """
        rng = np.random.default_rng(epoch_seed(self.seed, epoch, 1000 + self.rank))
        mine = self._rank_blocks(self.rank)
        rows = self._mix_blocks(rng, [mine[i] for i in rng.permutation(len(mine))])
        lo, hi = slice_range(self.batch_size, self.world, self.rank)
        size = hi - lo
        return [(rows[j * size : (j + 1) * size], lo, self.batch_size) for j in range(len(self))]

    def _batches(self, epoch: int) -> list[tuple[np.ndarray, int, int]]:
        """This rank's slice of each global batch: (rows, offset in the batch, global batch size)."""
        if self.rank_shards:
            return self._rank_plan(epoch)
        order = self.order(epoch)
        out = []
        for i in range(len(self)):
            rows = order[i * self.batch_size : (i + 1) * self.batch_size]
            lo, hi = slice_range(len(rows), self.world, self.rank)
            out.append((rows[lo:hi], lo, len(rows) if self.world > 1 else 0))
        return out

    def epoch(self, epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
        """Yield this rank's batches of ``epoch``, starting after the first ``skip``."""
        plan = self._batches(epoch)[skip:]
        if not plan:
            return
        if self._store is not None and self.workers > 0:  # the DataLoader's processes prefetch
            yield from self._jpeg(plan, epoch, skip)
            return
        if self.prefetch <= 0:
            yield from self._produce(plan, epoch, skip)
            return
        # A reader thread overlaps disk reads and batch assembly with the training step.
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for b in self._produce(plan, epoch, skip):
                    while not stop.is_set():
                        try:
                            q.put(b, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                q.put(None)
            except BaseException as e:  # re-raised in the consumer
                q.put(e)

        t = threading.Thread(target=work, daemon=True, name="sicot-loader")
        t.start()
        try:
            while True:
                item = q.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            t.join(timeout=5)

    def _produce(self, plan: list[tuple[np.ndarray, int, int]], epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
        if self._store is not None:
            decoder = self._decoder(plan, epoch, skip)
            for j, (rel, offset, total) in enumerate(plan):
                yield self._batch(rel, decoder.decode(j), offset, total, self.crop is not None)
            return
        if self._ram is not None:
            for rel, offset, total in plan:
                yield self._batch(rel, self._ram[rel], offset, total)
            return
        try:
            yield from self._stream(plan)
        except (OSError, KeyError) as e:  # h5py reports a failed read as OSError
            raise read_error(self.p.path, e) from None

    def _stream(self, plan: list[tuple[np.ndarray, int, int]]) -> Iterator[Batch]:
        cache: OrderedDict[int, np.ndarray] = OrderedDict()
        keep = 2 * self.shuffle_blocks
        self.p.check_unchanged()
        with h5py.File(self.p.path, "r") as f:
            images = f["images"]
            for rel, offset, total in plan:
                block_ids = rel // self.block_rows
                needed = np.unique(block_ids)
                for b in needed:
                    if b not in cache:
                        lo = self.start + b * self.block_rows
                        cache[b] = images[lo : min(lo + self.block_rows, self.stop)]
                # the oldest blocks go, never one this batch reads: a batch can span more than `keep`
                # blocks (small train.block_rows), and evicting one of them was reported as a damaged file
                for b in [b for b in cache if b not in set(needed.tolist())][: max(0, len(cache) - keep)]:
                    del cache[b]
                out = np.empty((len(rel), *images.shape[1:]), dtype=np.uint8)
                for b in needed:
                    sel = block_ids == b
                    out[sel] = cache[b][rel[sel] - b * self.block_rows]
                yield self._batch(rel, out, offset, total)

    def _decoder(self, plan: list[tuple[np.ndarray, int, int]], epoch: int, skip: int) -> _JpegBatches:
        assert self._store is not None
        return _JpegBatches(
            self._store, self.p.image_size, [(rel + self.start, offset, total) for rel, offset, total in plan],
            self.seed, epoch, skip, self.crop, self._shards, 2 * self.shuffle_blocks,
        )  # fmt: skip

    def _jpeg(self, plan: list[tuple[np.ndarray, int, int]], epoch: int, skip: int) -> Iterator[Batch]:
        """Format 2 with worker processes: one DataLoader over this epoch's batches, in order."""
        from torch.utils.data import DataLoader

        loader = DataLoader(
            self._decoder(plan, epoch, skip), batch_size=None, shuffle=False, num_workers=self.workers,
            prefetch_factor=max(2, self.prefetch), pin_memory=False,
            # its own generator: the DataLoader draws its workers' base seed from it, and a draw
            # from torch's global one would shift the model's random numbers (exact resume)
            generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch, 2)),
            worker_init_fn=functools.partial(loader_worker_init, os.getpid()),  # no worker outlives a killed train
        )  # fmt: skip
        try:
            for j, images in enumerate(loader):
                if isinstance(images, str):  # a SicotError in a worker: its message, raised here
                    raise SicotError(images)
                rel, offset, total = plan[j]
                yield self._batch(rel, images, offset, total, self.crop is not None)
        except RuntimeError as e:  # a worker killed (out of memory) or unable to start
            raise SicotError(
                f"{self.p.path}: a loader process failed ({str(e).splitlines()[0]}): lower train.loader_workers "
                "(each holds a few shards and batches in memory); an interrupted run resumes with --resume"
            ) from None

    def _batch(
        self, rel: np.ndarray, images: np.ndarray, offset: int = 0, total: int = 0, augmented: bool = False
    ) -> Batch:
        rows = rel + self.start
        lengths = self.p.lengths[rows]
        width = max(1, int(lengths.max())) if len(rows) else 1
        tokens = torch.from_numpy(self.p.tokens[rows, :width].astype(np.int64))
        batch = Batch(
            torch.as_tensor(images),
            tokens,
            tokens != 0,
            torch.from_numpy(self.p.labels[rows]),
            rows,
            offset,
            total,
            augmented,
        )
        if self.pin_memory:  # in the reader thread, off the training step's path
            batch.images, batch.tokens, batch.mask, batch.labels = (
                t.pin_memory() for t in (batch.images, batch.tokens, batch.mask, batch.labels)
            )
        return batch


class _JpegBatches(torch.utils.data.Dataset):
    """Batch ``j`` of a plan, decoded: what each loader worker process runs (picklable, no open files).

    Training (``crop`` set): each image is the random resized crop and flip format 1 takes on the
    device, drawn from the same per-batch seed, ``epoch_seed(seed, epoch, 1 + batch)``, for the whole
    global batch and sliced for this rank; so a resumed epoch decodes exactly the batches it missed.
    A shard is read whole, its sha256 checked, and kept for the next batches (the shuffle buffer's
    ``keep`` shards). An error is returned as its message, so a worker's SicotError reaches the user
    as one line.
    """

    def __init__(
        self, store: Store, size: int, plan: list[tuple[np.ndarray, int, int]], seed: int, epoch: int, first: int,
        crop: tuple[float, float] | None, shards: dict[int, bytes] | None, keep: int,
    ) -> None:  # fmt: skip
        self.store, self.size, self.plan = store, size, plan
        self.seed, self.epoch, self.first, self.crop = seed, epoch, first, crop
        self.shards = shards
        self.keep = max(2, keep)
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, j: int) -> np.ndarray | str:
        try:
            return self.decode(j)
        except SicotError as e:
            return str(e)

    def _shard(self, k: int) -> bytes:
        if self.shards is not None:
            return self.shards[k]
        if k not in self._cache:
            self._cache[k] = self.store.read_shard(k)
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        return self._cache[k]

    def decode(self, j: int) -> np.ndarray:
        rows, offset, total = self.plan[j]
        n = len(rows)
        if self.crop is not None:
            gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch, 1 + self.first + j))
            boxes = crop_boxes(crop_flip_params(total or n, gen, self.crop)[offset : offset + n], self.store.side)
        out = np.empty((n, 3, self.size, self.size), dtype=np.uint8)
        s = self.store
        for i, row in enumerate(rows.tolist()):
            data = self._shard(int(s.shard[row]))
            blob = data[int(s.offset[row]) : int(s.offset[row]) + int(s.length[row])]
            box, flip = boxes[i] if self.crop is not None else (None, False)
            try:
                out[i] = decode_row(blob, self.size, box, flip)
            except (OSError, ValueError, SyntaxError) as e:
                raise SicotError(
                    f"{s.folder / s.names[int(s.shard[row])]}: row {row}'s image does not decode ({e}): "
                    "rebuild the dataset with `sicot prepare --force`"
                ) from None
        return out


def decode_workers(requested: int, threads: int) -> int:
    """Loader processes for format-2 data: ``requested``, or the cores the step's threads leave (1 to 16)."""
    import os

    return requested or max(1, min(16, (os.cpu_count() or 1) - threads))
