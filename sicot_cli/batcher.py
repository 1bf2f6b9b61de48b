"""Dynamic micro-batching for ``sicot serve``: images of concurrent requests share forward passes.

An asyncio loop collects queued requests into batches of at most ``max_batch`` images and runs
the model on each batch in one worker thread (so the event loop keeps receiving uploads while the
model works), then hands every request its rows of the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

log = logging.getLogger(__name__)


class Busy(Exception):
    """The queue is full."""


class MicroBatcher:
    """Collects images from concurrent requests into batches for one model thread.

    The loop takes the first waiting request, then every request already queued, then waits up to
    ``max_wait_ms`` for more while the batch holds fewer than ``max_batch`` images, but only while
    other requests are on their way (being received or decoded, :meth:`arriving`): a lone request
    is never kept waiting. A request that would overflow the batch opens the next one. Requests
    whose caller gave up are dropped.
    """

    def __init__(
        self, infer: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_ms: float, max_queue: int
    ) -> None:
        self._infer = infer
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = asyncio.Queue()
        self._carry: tuple[np.ndarray, asyncio.Future[np.ndarray]] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sicot-model")
        self._task: asyncio.Task[None] | None = None
        self.waiting = 0  # images queued, not yet in a forward pass
        self.incoming = 0  # requests being received or decoded: worth waiting for
        self.batches = 0
        self.images = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request on its way to :meth:`submit` (its upload and decoding)."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """Probabilities ``[n, C]`` of ``images`` ``[n, 3, S, S]``, computed in some batch.

        Raises:
            Busy: more than ``max_queue`` images are already waiting.
        """
        if self.waiting + len(images) > self.max_queue:
            raise Busy
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self.waiting += len(images)
        self._queue.put_nowait((images, fut))
        return await fut

    async def _next(self, timeout: float | None) -> tuple[np.ndarray, asyncio.Future[np.ndarray]] | None:
        if self._carry is not None:
            item, self._carry = self._carry, None
            return item
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return None if self._queue.empty() else self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except TimeoutError:
            return None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray]]] = []
            n = 0
            deadline = None
            while n < self.max_batch:
                wait = None if not batch else max(0.0, deadline - loop.time()) if self.incoming else 0.0
                item = await self._next(wait)
                if item is None:
                    break
                images, fut = item
                if fut.done():  # its caller timed out or went away
                    self.waiting -= len(images)
                    continue
                if batch and n + len(images) > self.max_batch:
                    self._carry = item
                    break
                batch.append(item)
                n += len(images)
                if deadline is None:
                    deadline = loop.time() + self.max_wait
            if not batch:
                continue
            self.waiting -= n
            x = batch[0][0] if len(batch) == 1 else np.concatenate([b[0] for b in batch])
            try:
                probs = await loop.run_in_executor(self._executor, self._infer, x)
            except Exception as e:  # noqa: BLE001 - a model failure answers its requests with 500, the loop goes on
                log.exception("model failed on a batch of %d", n)
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.batches += 1
            self.images += n
            at = 0
            for images, fut in batch:
                if not fut.done():
                    fut.set_result(probs[at : at + len(images)])
                at += len(images)
