"""produce_changelog: a commit's marker never lands unless every record of the commit did."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.joiner.changelog import HEADER_TAG, TOPIC_STORE_CHANGELOG, make_tag, marker_key
from streams.joiner.outputs import batch_sender, produce_changelog

TAG = make_tag(5, 9)


class FakeSendMany:
    """``send_many`` whose acks the test resolves (or fails) itself; one batch per call unless the
    call holds more than ``per_batch`` records (then, asked for one batch, it sends nothing)."""

    def __init__(self, per_batch: int = 10**9) -> None:
        self.calls: list[list] = []
        self.futures: list[asyncio.Future] = []
        self.per_batch = per_batch
        self.end = 0

    async def __call__(self, topic, partition, records, whole=False):
        assert topic == TOPIC_STORE_CHANGELOG and partition == 3
        if whole and len(records) > self.per_batch:
            return None
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
        task = asyncio.ensure_future(produce_changelog(None, 3, TAG, changes, sm))
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
            task = asyncio.ensure_future(produce_changelog(None, 3, TAG, changes, sm))
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


class FakeProducer:
    """What batch_sender uses of aiokafka's producer: it records the record batches submitted."""

    _compression_type = None

    def __init__(self) -> None:
        self.sent: list[int] = []  # records per batch

    async def send_batch(self, builder, topic, partition):
        self.sent.append(builder.record_count())
        fut = asyncio.get_running_loop().create_future()
        fut.set_result(SimpleNamespace(offset=0))
        return fut


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.binary(min_size=1, max_size=300),
                          st.one_of(st.none(), st.binary(max_size=3_000))), max_size=40),
       st.sampled_from([0, 1, 127, 128, 16383, 16384]))
def test_a_whole_commit_is_one_record_batch_or_nothing_sent(changes, pad):
    """batch_sender with whole=True (the changelog commit with its marker) either submits exactly
    one of aiokafka's record batches holding every record, or submits nothing: a commit is never
    split by the size bookkeeping. Values near the varint length steps included; the limit is
    small so that both outcomes occur."""
    headers = [(HEADER_TAG, TAG)]
    records = [(k, v if v is None else v + b"p" * pad, headers) for k, v in changes]
    records.append((marker_key(5), TAG, headers))

    async def main():
        producer = FakeProducer()
        out = await batch_sender(producer, 20_000)(TOPIC_STORE_CHANGELOG, 3, records, whole=True)
        return producer, out
    producer, out = asyncio.run(main())
    if out is None:
        assert producer.sent == []
    else:
        assert producer.sent == [len(records)] and [n for _f, n in out] == [len(records)]


def test_without_whole_the_records_are_cut_into_batches_in_order():
    headers = [(HEADER_TAG, TAG)]
    records = [(b"k%d" % i, b"v" * 5_000, headers) for i in range(10)]

    async def main():
        producer = FakeProducer()
        out = await batch_sender(producer, 12_000)(TOPIC_STORE_CHANGELOG, 3, records)
        return producer, out
    producer, out = asyncio.run(main())
    assert len(producer.sent) > 1 and sum(producer.sent) == 10 and [n for _f, n in out] == producer.sent
