"""Stand-ins for faust's side of ``JoinerRuntime`` in tests that drive the runtime directly: the
consumed records of a list of events, and an acked send."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

from streams.contracts import encode, key_for, topic_for


def consumed(events, partition: int = 0) -> list[SimpleNamespace]:
    """The records a consumer would hand over for ``events`` (one partition, offsets per topic
    in list order): what ``JoinerRuntime.handle`` reads of a faust ``Message``."""
    offsets: dict[str, int] = {}
    out = []
    for e in events:
        t = topic_for(e)
        offsets[t] = offsets.get(t, -1) + 1
        out.append(SimpleNamespace(topic=t, partition=partition, offset=offsets[t], key=key_for(e), value=encode(e)))
    return out


def acked(offset: int) -> asyncio.Future:
    """A producer's send result, already acknowledged at ``offset`` (inside a running loop)."""
    fut = asyncio.get_running_loop().create_future()
    fut.set_result(SimpleNamespace(offset=offset))
    return fut
