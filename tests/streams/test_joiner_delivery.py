"""BatchDrain: fetches handed over as lists, merged up to a size, dropped when the flow stops.

The drain's loop itself runs in every joiner app test (tests/streams/test_joiner_app.py: real
faust consumer on the embedded broker); these tests pin the hand-over rules.
"""
from __future__ import annotations

import asyncio

import pytest
from mode.utils.locks import Event

from streams.joiner.delivery import BatchDrain


def run(coro):
    return asyncio.run(coro)


def test_get_merges_queued_fetches_up_to_max_records_but_returns_at_least_one_fetch():
    async def main():
        d = BatchDrain(["t"], max_batches=8)
        for batch in ([1, 2, 3], [4, 5], [6, 7, 8, 9], [10]):
            d.queue.put_nowait((0, batch))
        first = await d.get(5)      # [1,2,3] + [4,5] = 5; [6..9] would pass 5
        second = await d.get(2)     # one fetch larger than max_records still comes whole
        third = await d.get(100)
        return first, second, third, d.queue.empty()
    first, second, third, empty = run(main())
    assert first == [1, 2, 3, 4, 5]
    assert second == [6, 7, 8, 9]
    assert third == [10] and empty


def test_fetches_of_an_older_consumer_generation_are_dropped_when_taken():
    async def main():
        d = BatchDrain(["t"], max_batches=8)
        gen = [1]
        d._generation = lambda: gen[0]
        d.queue.put_nowait((1, ["old-1"]))
        d.queue.put_nowait((2, ["new-1"]))
        d.queue.put_nowait((1, ["old-2"]))
        d.queue.put_nowait((2, ["new-2"]))
        gen[0] = 2                                # a rebalance happened meanwhile
        return await d.get(10), d.counters()["delivery_dropped"], d.queue.empty()
    out, dropped, empty = run(main())
    assert out == ["new-1", "new-2"] and dropped == 2 and empty


def test_hand_over_waits_for_room_and_drops_when_the_flow_is_suspended():
    async def main():
        d = BatchDrain(["t"], max_batches=1)
        suspend = Event()
        assert await d._hand_over(d.queue, (0, ["a"]), suspend)   # room: queued at once
        waiting = asyncio.ensure_future(d._hand_over(d.queue, (0, ["b"]), suspend))
        await asyncio.sleep(0.05)
        assert not waiting.done()                                  # full: back-pressure
        assert await d.get(10) == ["a"]
        assert await waiting                                       # room again: queued
        blocked = asyncio.ensure_future(d._hand_over(d.queue, (0, ["c"]), suspend))
        await asyncio.sleep(0.05)
        suspend.set()                                              # a rebalance starts
        dropped = not await blocked
        suspended_now = not await d._hand_over(d.queue, (0, ["d"]), suspend)
        left = [await d.get(10) for _ in range(d.queue.qsize())]
        return dropped, suspended_now, left
    dropped, suspended_now, left = run(main())
    assert dropped and suspended_now
    assert left == [["b"]]                                          # "c" and "d" never queued


def test_install_replaces_the_consumers_drain_loop():
    class Consumer:
        async def _drain_messages(self, fetcher):
            raise AssertionError("faust's per-record loop must not run")
    c = BatchDrain(["t"]).install(Consumer())
    assert c._drain_messages.__qualname__.startswith("BatchDrain.install")
    with pytest.raises(ValueError, match="max_batches"):
        BatchDrain(["t"], max_batches=0)


def test_records_of_a_rebalance_that_ended_during_the_fetch_wait_are_handed_over():
    """faust's getmany yields the records of the generation current when its wait ended; the drain
    tags a fetch with that generation, not the one before the wait (those records would be dropped
    after their read offsets moved past them)."""
    from types import SimpleNamespace

    async def main():
        d = BatchDrain(["t"], max_batches=4)
        gen = [1]
        d._generation = lambda: gen[0]
        d._flowing = lambda: True
        stopped = asyncio.Event()

        class Consumer:
            _read_offset = {("t", 0): None}
            _commit_every = None
            _n_acked = 0
            _stopped = stopped
            suspend_flow = Event()
            callback = None
            app = SimpleNamespace(topics=SimpleNamespace(acks_enabled_for=lambda topic: True))

            async def getmany(self, timeout):
                gen[0] = 2                       # the rebalance ends while the fetch waits
                await asyncio.sleep(0)
                for offset in (0, 1):
                    yield ("t", 0), SimpleNamespace(topic="t", partition=0, offset=offset)
                stopped.set()

        await d._run(Consumer(), SimpleNamespace(_stopped=asyncio.Event()))
        got = [m.offset for m in await asyncio.wait_for(d.get(10), 2)] if not d.queue.empty() else []
        return got, d.counters()
    offsets, counters = run(main())
    assert offsets == [0, 1]
    assert counters["delivery_dropped"] == 0 and counters["delivery_records"] == 2
