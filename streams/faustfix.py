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
variable: it covers the recovery task running the method, not a rebalance handled meanwhile.
"""
from __future__ import annotations

import contextvars
import functools
import logging
from typing import Any, Awaitable, Callable, Iterable

from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer

logger = logging.getLogger(__name__)

_MARK = "_streamrec_faustfix"
_HELD: contextvars.ContextVar[set | None] = contextvars.ContextVar("streamrec_held_input_partitions", default=None)


def _holding_resume(resume: Callable[[Consumer, Iterable], None]) -> Callable[[Consumer, Iterable], None]:
    @functools.wraps(resume)
    def resume_partitions(self: Consumer, tps: Iterable) -> None:
        held = _HELD.get()
        if held is not None:
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
        token = _HELD.set(held)
        try:
            await method(self, generation_id, *args, **kwargs)
        finally:
            _HELD.reset(token)
        if not held:
            return  # the method returned early (a newer rebalance) and resumed nothing
        if self.app.consumer_generation_id != generation_id:
            logger.info("recovery of generation %d superseded; %d input partitions stay paused",
                        generation_id, len(held))
            return
        consumer = self.app.consumer
        consumer.resume_partitions(held & set(consumer.assignment()))
    setattr(wrapper, _MARK, True)
    return wrapper


def install() -> None:
    """Patch faust's ``Consumer.resume_partitions`` and the two recovery methods (idempotent)."""
    if not getattr(Consumer.resume_partitions, _MARK, False):
        Consumer.resume_partitions = _holding_resume(Consumer.resume_partitions)
    for name in ("on_recovery_completed", "_resume_streams"):
        method = getattr(Recovery, name)
        if not getattr(method, _MARK, False):
            setattr(Recovery, name, _resume_inputs_after(method))
