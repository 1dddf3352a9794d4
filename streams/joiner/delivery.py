"""Batch delivery: the joiner's source records reach it one fetch at a time, not one event at a time.

faust hands every record to its streams through ``Consumer._drain_messages``: per record it awaits
``wait_first(callback(message), suspend_flow.wait())`` (two tasks and several event-loop turns),
takes the conductor's lock, builds an ``Event``, queues it and runs the stream's processors
(``stream.take`` / ``noack_take`` among them). An agent that does nothing with its ``noack_take``
batches gets about 8-11K records/s through that path on one core (docs/joiner.md, "Throughput"),
below what the joiner's own batch code does, and the records wait in aiokafka's buffer meanwhile
(0.1-0.3 s at 5K records/s), which was most of the window close -> sample latency.

:class:`BatchDrain` replaces that loop on the joiner's consumer. It keeps faust's consumer, group
membership, rebalancing, offset bookkeeping (read offsets, gaps, commit intervals) and commits;
only the records of the joiner's own topics take the short path: each ``getmany`` result becomes
one list of faust ``Message`` objects on a bounded queue, which the joiner's task takes with
:meth:`BatchDrain.get` and acknowledges with ``consumer.ack`` once the store commit covers them
(as before). Records of any other topic still go through faust's per-record path. A rebalance
(faust suspends the flow) drops the fetch being handed over, and fetches queued under an older
consumer generation or taken during a rebalance are dropped: their partitions may have moved
(faust's own streams skip such events the same way). faust seeks the
partitions again after the rebalance, and the joiner to its stores' offsets (its aligner drops
what it has seen, and seeks back over a gap).
"""
from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


class BatchDrain:
    """The joiner's replacement of ``Consumer._drain_messages`` (see the module docstring).

    ``max_batches``: fetches queued before the consumer waits for the joiner (back-pressure; each
    holds at most ``broker_max_poll_records`` records).
    """

    def __init__(self, topics: Iterable[str], max_batches: int = 4) -> None:
        if max_batches < 1:
            raise ValueError(f"max_batches={max_batches!r} must be >= 1")
        self.topics = frozenset(topics)
        self.max_batches = max_batches
        self._queue: asyncio.Queue | None = None
        self._carry: tuple[int, list[Any]] | None = None  # a fetch taken but left for the next get()
        self._generation = lambda: 0
        self._flowing = lambda: True
        self.n_fetches = self.n_records = self.n_dropped = 0

    @property
    def queue(self) -> asyncio.Queue:
        if self._queue is None:  # created on the running loop
            self._queue = asyncio.Queue(self.max_batches)
        return self._queue

    def install(self, consumer: Any) -> Any:
        """Make ``consumer`` (faust's, before it starts) deliver through this drain."""
        drain = self
        self._generation = lambda: consumer.app.consumer_generation_id
        self._flowing = lambda: consumer.app.flow_control.is_active()

        async def _drain_messages(fetcher) -> None:
            await drain._run(consumer, fetcher)
        consumer._drain_messages = _drain_messages
        return consumer

    async def get(self, max_records: int) -> list[Any]:
        """The next fetch's records, with the fetches queued behind it while they add up to at most
        ``max_records`` (at least one fetch, whatever its size; one that would pass the limit waits
        for the next call). Fetches of an older consumer generation, or taken while faust's flow is
        stopped (a rebalance), are dropped (counted in ``delivery_dropped``), as faust's streams
        skip such events."""
        q = self.queue
        out: list[Any] = []
        while not out:
            fetch, self._carry = self._carry or await q.get(), None
            out = self._current(fetch)
        while not q.empty():
            more = self._current(q.get_nowait())
            if len(out) + len(more) > max_records:
                self._carry = (self._generation(), more)
                break
            out += more
        return out

    def _current(self, fetch: tuple[int, list[Any]]) -> list[Any]:
        """The fetch's records, or [] (counted as dropped) when they are stale."""
        gen, records = fetch
        if gen == self._generation() and self._flowing():
            return records
        self.n_dropped += len(records)
        return []

    async def _run(self, consumer, fetcher) -> None:
        # faust's loop (Consumer._drain_messages), with one hand-over per fetch for our topics
        callback = consumer.callback
        read_offset = consumer._read_offset
        acks_enabled_for = consumer.app.topics.acks_enabled_for
        topics = self.topics
        queue = self.queue
        while not (consumer._stopped.is_set() or fetcher._stopped.is_set()):
            batch, others = [], []
            generation = None
            async for tp, message in consumer.getmany(timeout=1.0):
                if generation is None:
                    # read at the first record, not before the fetch's wait: faust's getmany yields
                    # the records of the generation current when the wait ended (and stops if it
                    # changes); a rebalance that ended during the wait must not mark them stale
                    generation = self._generation()
                offset = message.offset
                r_offset = read_offset[tp]
                if r_offset is not None and offset < r_offset:
                    continue  # faust drops these too (a re-fetch after a seek)
                if r_offset and offset - r_offset > 1 and acks_enabled_for(message.topic):
                    await consumer._add_gap(tp, r_offset + 1, offset)
                read_offset[tp] = offset
                (batch if message.topic in topics else others).append(message)
            await asyncio.sleep(0)
            for message in others:
                await consumer.wait_first(callback(message), consumer.suspend_flow.wait())
            if batch:
                every = consumer._commit_every
                if every is not None and consumer._n_acked >= every:
                    consumer._n_acked = 0
                    await consumer.commit()
                if generation == self._generation() and await self._hand_over(
                        queue, (generation, batch), consumer.suspend_flow):
                    self.n_fetches += 1
                    self.n_records += len(batch)
                else:
                    self.n_dropped += len(batch)

    @staticmethod
    async def _hand_over(queue: asyncio.Queue, batch: tuple[int, list[Any]], suspend_flow) -> bool:
        """Queue ``batch``, waiting for room unless the flow is (or gets) suspended: False then."""
        if suspend_flow.is_set():
            return False
        if not queue.full():
            queue.put_nowait(batch)
            return True
        put = asyncio.ensure_future(queue.put(batch))
        suspended = asyncio.ensure_future(suspend_flow.wait())
        try:
            await asyncio.wait((put, suspended), return_when=asyncio.FIRST_COMPLETED)
        finally:
            suspended.cancel()
            if not put.done():
                put.cancel()
        return put.done() and not put.cancelled()

    def counters(self) -> dict[str, int]:
        return {"delivery_fetches": self.n_fetches, "delivery_records": self.n_records,
                "delivery_dropped": self.n_dropped}


__all__ = ["BatchDrain"]
