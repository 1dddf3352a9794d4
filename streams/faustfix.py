"""A fix for a record-losing race in faust-streaming's recovery (faust-streaming issue #596).

When a rebalance's recovery ends, faust (0.15.x) runs, in ``Recovery.on_recovery_completed`` and
``Recovery._resume_streams``::

    consumer.resume_partitions(<input partitions>)   # records of these now reach the streams
    await consumer.perform_seek()                     # one committed-offset request per partition
    app.flow_control.resume()                         # clears every stream's in-memory queue

While ``perform_seek`` awaits the broker, partition by partition, the fetcher keeps delivering
records of the already-resumed input partitions. A record fetched after its partition was
positioned and delivered before ``flow_control.resume()`` is either skipped by the stream (flow
control suspended) or cleared from the stream's queue; faust has already moved its read offset
past it and never acks it, so it is lost until the next rebalance. A record delivered *before*
its partition is positioned can be processed and then fetched again (a duplicate).

``install()`` holds the input partitions paused while either method runs (changelog partitions
pass through) and resumes them once it has sought and cleared, for the same consumer generation
only and only those still assigned. Records of paused partitions are not handed to the streams
(faust asks the fetcher for active partitions only, and a seek discards what was buffered), so
the first record a stream sees is the one at the committed offset. The hold is a context
variable naming the task that runs the method: tasks started from inside it (faust's fetcher)
inherit the variable but not the hold. If a new rebalance began meanwhile (faust counts them in
``app.rebalancing_count``), the held partitions stay paused: that rebalance resumes its own.

Holding the inputs makes faust's set of active partitions empty while it seeks (the changelog
partitions are paused once read), which exposed a second fault: faust hands that *live* set to
aiokafka's ``fetched_records``, which reads an empty set as "every partition", so a fetch already
waiting returned the input records fetched after the seek, and faust dropped them (not active)
with aiokafka's position past them: a restarted test worker sat idle (2 runs in about 10).
``install()`` therefore also hands aiokafka a view of faust's live set in which empty means no
partition. It stays live, as faust meant it: a partition that becomes active while a fetch waits
(a stream buffer drained below its limit, say) is served by that fetch.
"""
from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from typing import Any, Awaitable, Callable, Iterable

from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer, ThreadDelegateConsumer

logger = logging.getLogger(__name__)

_MARK = "_streamrec_faustfix"
#: (the task running a wrapped recovery method, the input partitions it asked to resume)
_HELD: contextvars.ContextVar[tuple[asyncio.Task | None, set] | None] = contextvars.ContextVar(
    "streamrec_held_input_partitions", default=None)


def _holding_resume(resume: Callable[[Consumer, Iterable], None]) -> Callable[[Consumer, Iterable], None]:
    @functools.wraps(resume)
    def resume_partitions(self: Consumer, tps: Iterable) -> None:
        hold = _HELD.get()
        if hold is not None and hold[0] is asyncio.current_task():
            held = hold[1]
            tps = set(tps)
            inputs = {tp for tp in tps if not self._is_changelog_tp(tp)}
            held.update(inputs)
            tps -= inputs
        resume(self, tps)
    setattr(resume_partitions, _MARK, True)
    return resume_partitions


def _resume_inputs_after(method: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    @functools.wraps(method)
    async def wrapper(self: Recovery, generation_id: int = 0, *args: Any, **kwargs: Any) -> None:
        held: set = set()
        rebalances = self.app.rebalancing_count
        token = _HELD.set((asyncio.current_task(), held))
        try:
            await method(self, generation_id, *args, **kwargs)
        finally:
            _HELD.reset(token)
        if not held:
            return  # the method returned early (a newer rebalance) and resumed nothing
        if self.app.consumer_generation_id != generation_id or self.app.rebalancing_count != rebalances:
            logger.info("recovery of generation %d superseded; %d input partitions stay paused",
                        generation_id, len(held))
            return
        consumer = self.app.consumer
        consumer.resume_partitions(held & set(consumer.assignment()))
    setattr(wrapper, _MARK, True)
    return wrapper


class _LivePartitions:
    """faust's live set of active partitions as aiokafka's ``fetched_records`` reads it (``if
    partitions and tp not in partitions``), except that an empty set means no partition."""

    __slots__ = ("_tps",)

    def __init__(self, tps) -> None:
        self._tps = tps

    def __contains__(self, tp) -> bool:
        return tp in self._tps

    def __bool__(self) -> bool:
        return True


def _never_all(getmany: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(getmany)
    async def _getmany(self: ThreadDelegateConsumer, active_partitions, timeout: float):
        live = None if active_partitions is None else _LivePartitions(active_partitions)
        return await getmany(self, live, timeout)
    setattr(_getmany, _MARK, True)
    return _getmany


def install() -> None:
    """Patch faust's ``Consumer.resume_partitions``, the fetch and the two recovery methods (idempotent)."""
    if not getattr(Consumer.resume_partitions, _MARK, False):
        Consumer.resume_partitions = _holding_resume(Consumer.resume_partitions)
    if not getattr(ThreadDelegateConsumer._getmany, _MARK, False):
        ThreadDelegateConsumer._getmany = _never_all(ThreadDelegateConsumer._getmany)
    for name in ("on_recovery_completed", "_resume_streams"):
        method = getattr(Recovery, name)
        if not getattr(method, _MARK, False):
            setattr(Recovery, name, _resume_inputs_after(method))
