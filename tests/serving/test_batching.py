"""The micro-batcher's waiting rule when it knows what is on its way (dogtl bot's downloads)."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from dogtl.serving.batching import MicroBatcher


def test_waits_only_for_requests_on_their_way():
    calls, coming = [], [0]

    def predict(inputs):
        calls.append(len(inputs[0]))
        return inputs[0] * 2

    async def main():
        batcher = MicroBatcher(predict, max_batch=8, max_wait_s=2.0, coming=lambda: coming[0])
        await batcher.start()
        t = time.perf_counter()
        lone = await batcher.submit((np.array([1.0]),))  # nothing else on its way: no wait
        lone_s = time.perf_counter() - t

        async def arrives_later():
            await asyncio.sleep(0.2)
            coming[0] = 0  # as the bot does: no longer on its way, and submitted at once
            return await batcher.submit((np.array([3.0]),))

        coming[0] = 1
        t = time.perf_counter()
        pair = await asyncio.gather(batcher.submit((np.array([2.0]),)), arrives_later())
        pair_s = time.perf_counter() - t
        await batcher.stop()
        return lone, lone_s, pair, pair_s

    lone, lone_s, pair, pair_s = asyncio.run(main())
    assert lone[0] == 2 and lone_s < 1.0  # far below max_wait_s
    assert [row[0] for row in pair] == [4, 6] and 0.2 <= pair_s < 1.5  # waited for the second, not the deadline
    assert calls == [1, 2]
