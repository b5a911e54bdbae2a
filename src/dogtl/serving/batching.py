"""Micro-batching: requests that arrive together share one model call.

Each request puts its preprocessed image on a queue and awaits a future. One worker takes the
first waiting image, then whatever else arrives within `max_wait_s`, up to `max_batch`
images, and runs the model once on the stack in a single model thread; every request gets
its row. With max_batch=1 every image is its own call (the benchmark's "unbatched").
Given `coming` (how many requests are on their way: being downloaded or decoded), it waits only
while some are, so a lone request is not held up at all.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from dogtl.core.errors import SettingError

log = logging.getLogger(__name__)


class MicroBatcher:
    def __init__(self, predict: Callable[[tuple], np.ndarray], max_batch: int = 32, max_wait_s: float = 0.005,
                 coming: Callable[[], int] | None = None):
        if max_batch < 1:
            raise SettingError(f"--max-batch {max_batch} must be at least 1")
        self.predict, self.max_batch, self.max_wait_s = predict, int(max_batch), float(max_wait_s)
        self.coming = coming
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dogtl-model")
        self.calls = 0  # model calls made (for tests and the benchmark)
        self.images = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """After the server has finished its requests: end the worker."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._model_thread.shutdown(wait=True)

    async def submit(self, inputs: tuple) -> np.ndarray:
        """The model's output row for one image's inputs (a tuple of arrays, one per model input)."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((inputs, future))
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = time.perf_counter() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                if self.coming is not None and self.coming() == 0:
                    break
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            batch = [(x, f) for x, f in batch if not f.done()]  # a cancelled request needs no row
            if not batch:
                continue
            stacked = tuple(np.stack(parts) for parts in zip(*(x for x, _ in batch)))
            try:
                rows = await loop.run_in_executor(self._model_thread, self.predict, stacked)
            except Exception as e:  # the model failed on this batch: every request in it hears why
                log.exception("model call failed")
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.calls += 1
            self.images += len(batch)
            for (_, future), row in zip(batch, rows):
                if not future.done():
                    future.set_result(row)
