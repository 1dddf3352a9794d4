"""produce_changelog: a commit's marker never lands unless every record of the commit did."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.joiner.changelog import HEADER_TAG, TOPIC_STORE_CHANGELOG, make_tag, marker_key
from streams.joiner.outputs import changelog_batch_bytes, produce_changelog

TAG = make_tag(5, 9)


class FakeSendMany:
    """``send_many`` whose acks the test resolves (or fails) itself; one batch per call unless the
    call holds more than ``per_batch`` records."""

    def __init__(self, per_batch: int = 10**9) -> None:
        self.calls: list[list] = []
        self.futures: list[asyncio.Future] = []
        self.per_batch = per_batch
        self.end = 0

    async def __call__(self, topic, partition, records):
        assert topic == TOPIC_STORE_CHANGELOG and partition == 3
        self.calls.append(list(records))
        out = []
        for i in range(0, len(records), self.per_batch):
            n = min(self.per_batch, len(records) - i)
            fut = asyncio.get_running_loop().create_future()
            fut.base, self.end = self.end, self.end + n
            self.futures.append(fut)
            out.append((fut, n))
        return out

    def ack_all(self) -> None:
        for fut in self.futures:
            if not fut.done():
                fut.set_result(SimpleNamespace(offset=fut.base))


def is_marker(record) -> bool:
    return record[0] == marker_key(5) and record[1] == TAG


def test_a_commit_that_fits_one_record_batch_goes_with_its_marker_in_one_call():
    async def main():
        sm = FakeSendMany()
        task = asyncio.ensure_future(produce_changelog(None, 3, TAG, [(b"k1", b"v1"), (b"k2", None)], sm))
        await asyncio.sleep(0)
        sm.ack_all()
        return await task, sm
    end, sm = asyncio.run(main())
    assert len(sm.calls) == 1
    assert [r[:2] for r in sm.calls[0][:2]] == [(b"k1", b"v1"), (b"k2", None)]
    assert is_marker(sm.calls[0][-1]) and all(dict(r[2])[HEADER_TAG] == TAG for r in sm.calls[0])
    assert end == 3


def test_a_larger_commit_sends_its_marker_only_after_every_record_is_acked():
    changes = [(b"k%d" % i, b"x" * 100) for i in range(20)]

    async def main():
        sm = FakeSendMany(per_batch=5)  # the records go out in 4 batches
        task = asyncio.ensure_future(produce_changelog(None, 3, TAG, changes, sm, one_batch_bytes=1000))
        for _ in range(5):
            await asyncio.sleep(0)
        before = [list(c) for c in sm.calls]
        sm.ack_all()
        for _ in range(5):
            await asyncio.sleep(0)
        sm.ack_all()
        return before, await task, sm
    before, end, sm = asyncio.run(main())
    assert len(before) == 1 and not any(is_marker(r) for r in before[0])  # no marker while unacked
    assert len(sm.calls) == 2 and len(sm.calls[1]) == 1 and is_marker(sm.calls[1][0])
    assert end == 21


@pytest.mark.parametrize("path", ["send_many", "send"])
def test_a_failed_record_batch_means_no_marker_at_all(path):
    """The case the two steps are for: the first batch fails, a later one is acked."""
    changes = [(b"k%d" % i, b"x" * 100) for i in range(20)]

    async def main():
        sm = FakeSendMany(per_batch=5)
        sent: list = []

        async def send(topic, key, value, partition, headers):  # per record, acks in sm.futures
            sent.append((key, value, headers))
            return (await sm(topic, partition, [(key, value, headers)]))[0][0]
        if path == "send_many":
            task = asyncio.ensure_future(produce_changelog(None, 3, TAG, changes, sm, one_batch_bytes=1000))
        else:
            task = asyncio.ensure_future(produce_changelog(send, 3, TAG, changes))
        for _ in range(5):
            await asyncio.sleep(0)
        sm.futures[0].set_exception(ConnectionError("request expired"))
        sm.ack_all()  # the later batches land
        with pytest.raises(ConnectionError):
            await task
        return sm
    sm = asyncio.run(main())
    assert not any(is_marker(r) for call in sm.calls for r in call)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=300),
                          st.one_of(st.none(), st.binary(max_size=300_000))), max_size=40),
       st.sampled_from([0, 1, 127, 128, 16383, 16384]))
def test_the_size_bound_holds_for_aiokafkas_record_batches(changes, pad):
    """changelog_batch_bytes bounds the batch aiokafka's BatchBuilder (the worker's send_many)
    builds from the same records, so a commit counted as one batch is never split. Values near
    the varint length steps (127/128, 16383/16384 bytes) included."""
    from aiokafka.producer.message_accumulator import BatchBuilder

    headers = [(HEADER_TAG, TAG)]
    records = [(k, v if v is None else v + b"p" * pad, headers) for k, v in changes]
    records.append((marker_key(5), TAG, headers))
    builder = BatchBuilder(1 << 40, 0)
    for key, value, hdrs in records:
        assert builder.append(timestamp=None, key=key, value=value, headers=hdrs) is not None
    builder.close()
    actual = builder.size()
    assert changelog_batch_bytes(records) >= actual


def test_the_size_bound_is_not_loose():
    """Within 64 bytes a record (and the batch header) of the real size."""
    from aiokafka.producer.message_accumulator import BatchBuilder

    headers = [(HEADER_TAG, TAG)]
    records = [(b"k%d" % i, b"v" * 50, headers) for i in range(100)]
    builder = BatchBuilder(1 << 40, 0)
    for key, value, hdrs in records:
        builder.append(timestamp=None, key=key, value=value, headers=hdrs)
    builder.close()
    actual = builder.size()
    assert actual <= changelog_batch_bytes(records) <= actual + 64 * 101
