"""PartitionReader: the joiner's read-backs of its output topics and its changelog replays go
through one kafka-python client on the embedded broker (streams/joiner/readback.py)."""
from __future__ import annotations

import pytest
from kafka import KafkaProducer

from streams.joiner.changelog import HEADER_TAG, read_changelog
from streams.joiner.readback import PartitionReader

TOPICS = [f"out{i}" for i in range(5)]


def _create(bootstrap: str, topics: dict[str, int], configs: dict[str, str] | None = None) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(t, num_partitions=n, replication_factor=1, topic_configs=configs or {})
                             for t, n in topics.items()])
    finally:
        admin.close()


@pytest.fixture(scope="module")
def events():
    """The bundled slice's first hour."""
    from streams.replay import iter_events
    from tests.streams.test_joiner_pipeline import SLICE
    evs = list(iter_events([SLICE]))
    return [e for e in evs if e.ts_ms < evs[0].ts_ms + 3_600_000]


def _produce(bootstrap: str, records) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    try:
        for topic, partition, key, value, headers in records:
            producer.send(topic, value, key=key, partition=partition, headers=headers or [])
        producer.flush(10)
    finally:
        producer.close(5)


@pytest.fixture
def filled(broker):
    """TOPICS x 3 partitions; partition p of topic i holds values b"i:p:0" .. b"i:p:(i+p-1)"."""
    _create(broker.bootstrap, {t: 3 for t in TOPICS})
    _produce(broker.bootstrap, [(t, p, None, f"{i}:{p}:{k}".encode(), None)
                                for i, t in enumerate(TOPICS) for p in range(3) for k in range(i + p)])
    return broker


def test_every_range_through_one_client_with_metadata_fetched_once(filled):
    reader = PartitionReader(filled.bootstrap, TOPICS)
    read_back = reader.read_values  # the runtime's read_back
    try:
        for p in range(3):
            for i, t in enumerate(TOPICS):
                assert read_back(t, p, 0) == [f"{i}:{p}:{k}".encode() for k in range(i + p)]
                assert read_back(t, p, 1) == [f"{i}:{p}:{k}".encode() for k in range(1, i + p)]
                assert read_back(t, p, i + p) == []        # at the end
                assert read_back(t, p, i + p + 5) == []    # past it
        assert reader.n_clients == 1
        # the client waits unassigned between reads (no fetches in the background)
        assert not reader._consumer.assignment()
    finally:
        reader.close()
    assert reader._consumer is None


def test_a_failed_read_replaces_the_client_and_later_reads_still_work(filled):
    reader = PartitionReader(filled.bootstrap, TOPICS)
    try:
        with pytest.raises(ZeroDivisionError):
            with reader.partition(TOPICS[2], 1) as rng:
                assert rng.end_offset() == 3
                for _ in rng.records(0, 3, timeout_s=10):
                    1 / 0
        assert reader._consumer is None  # closed: it may have been mid-request
        assert reader.read_values(TOPICS[2], 1, 2) == [b"2:1:2"]
        assert reader.n_clients == 2
    finally:
        reader.close()


def test_a_range_that_cannot_be_read_in_time_raises(filled):
    reader = PartitionReader(filled.bootstrap)  # no topics named up front: still works
    try:
        with reader.partition(TOPICS[4], 2) as rng:
            # the range's end lies past the partition's end: it can never be reached
            with pytest.raises(TimeoutError, match=r"out4\[2\] from 0 to 99"):
                for _ in rng.records(0, 99, timeout_s=0.5):
                    pass
        assert reader.read_values(TOPICS[4], 2, 5) == [b"4:2:5"]
    finally:
        reader.close()


def test_changelog_replay_reads_its_range_through_the_shared_reader(broker):
    """read_changelog on the reader: complete batches from the offset on are applied."""
    from streams.joiner.changelog import make_tag, marker_key
    _create(broker.bootstrap, {"cl": 2})
    records = []
    for seq in (1, 2, 3):  # three batches of writer 7, each two records and its marker
        tag = make_tag(7, seq)
        for k in range(2):
            records.append(("cl", 1, f"k{seq}{k}".encode(), f"v{seq}{k}".encode(), [(HEADER_TAG, tag)]))
        records.append(("cl", 1, marker_key(7), tag, [(HEADER_TAG, tag)]))
    _produce(broker.bootstrap, records)
    reader = PartitionReader(broker.bootstrap, ["cl"])
    applied: list = []
    try:
        res = read_changelog(reader, 1, 3, applied.extend, topic="cl")  # from batch 2 on
        assert res.end == 9
        assert res.n_commits == 2
        assert [k for k, _ in applied] == [b"k20", b"k21", b"k30", b"k31"]
        assert read_changelog(reader, 1, 9, applied.extend, topic="cl").n_commits == 0  # nothing past the end
        assert read_changelog(reader, 0, 0, applied.extend, topic="cl").end == 0        # an empty partition
        assert reader.n_clients == 1
    finally:
        reader.close()


def test_first_offset_finds_where_records_start_after_retention(broker):
    """Retention deleted a partition's oldest segments: the first record at or after offset 0 is
    the new log start; offsets that hold records answer themselves; past the end, the offset."""
    _create(broker.bootstrap, {"ev": 1}, {"segment.bytes": "1024", "retention.bytes": "1024"})
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)
    for i in range(40):  # one batch each: segments roll every few records
        producer.send("ev", b"x" * 100, partition=0).get(10)
    producer.close()
    assert broker.enforce_retention() > 0
    reader = PartitionReader(broker.bootstrap, ["ev"])
    try:
        start = reader.first_offset("ev", 0, 0)
        assert 0 < start < 40
        assert reader.first_offset("ev", 0, start - 1) == start
        assert reader.first_offset("ev", 0, start + 3) == start + 3
        assert reader.first_offset("ev", 0, 40) == 40 and reader.first_offset("ev", 0, 45) == 45
        assert reader.read_values("ev", 0, 0) == [b"x" * 100] * (40 - start)
    finally:
        reader.close()


def test_runtime_skips_offsets_that_hold_no_records_instead_of_seeking_forever(events, tmp_path):
    """An event topic whose offsets have a hole (records deleted by retention, compacted, or a
    transaction marker): the runtime asks where records resume, skips to there once (counted in
    source_offsets_skipped), and the samples are those of the same records without the hole.
    Without ``first_offset`` it seeks back to the hole again and again (the old behaviour)."""
    import asyncio

    from streams.contracts import EVENT_TOPICS
    from streams.joiner.app import JoinerAppConfig, JoinerRuntime
    from streams.joiner.pipeline import PipelineConfig
    from tests.streams.runtime_fakes import acked, consumed

    plain = consumed(events)
    holed = consumed(events)
    imps = [m for m in holed if m.topic == "impressions"]
    hole_at, hole = len(imps) // 2, 7
    for m in imps[hole_at:]:
        m.offset += hole

    runs = []

    def run(msgs, first_offset):
        samples, seeks = [], []
        runs.append(first_offset)

        async def send(topic, key, value, partition, headers):
            if topic == "samples":
                samples.append(value)
            return acked(0)

        async def seek(topic, p, offset):
            seeks.append((topic, offset))
            return True

        ends = {t: max(m.offset for m in msgs if m.topic == t) + 1 for t in {m.topic for m in msgs}}

        def caught_up(topic, p, next_offset):  # as faust's highwater says
            return next_offset >= ends.get(topic, 0)

        def first(topic, p, offset):
            return min(m.offset for m in msgs if m.topic == topic and m.offset >= offset)

        async def main():
            rt = JoinerRuntime(JoinerAppConfig(data_dir=tmp_path / f"run{len(runs)}",
                                               changelog=False, pipeline=PipelineConfig()),
                               send=send, read_back=lambda *a: [], caught_up=caught_up, seek=seek,
                               first_offset=first if first_offset else None)
            try:
                await rt.position(0)
                pending = list(msgs)
                for _ in range(4):  # a consumer: after a seek, the topic's records from there again
                    n_seeks = len(seeks)
                    await rt.handle(pending)
                    if len(seeks) == n_seeks:
                        break
                    topic, offset = seeks[-1]
                    pending = [m for m in msgs if m.topic == topic and m.offset >= offset]
                return rt.counters(), {t: rt.partitions[0].aligner.next_received(t) for t in EVENT_TOPICS}
            finally:
                rt.close()
        counters, nxt = asyncio.run(main())
        return samples, seeks, counters, nxt

    ref, ref_seeks, ref_counters, _ = run(plain, True)
    got, seeks, counters, nxt = run(holed, True)
    assert not ref_seeks and ref
    assert seeks == [("impressions", imps[hole_at].offset)]  # one seek, to where records resume
    assert counters["source_offsets_skipped"] == counters["source_offsets_skipped.impressions"] == hole
    assert nxt["impressions"] == imps[-1].offset + 1
    assert sorted(got) == sorted(ref)
    assert {k: v for k, v in counters.items() if not k.startswith("source_offsets")} == ref_counters

    _, old_seeks, old_counters, _ = run(holed, False)
    assert old_seeks == [("impressions", imps[hole_at - 1].offset + 1)] * 4  # seeks back, forever
    assert "source_offsets_skipped" not in old_counters


def test_an_idle_partition_skips_trailing_offsets_without_records(events, tmp_path, monkeypatch):
    """A topic whose last offsets hold no records and no later record comes (e.g. retention
    emptied a quiet topic past the store's offset): no gap ever shows, the topic never looks
    caught up, and the merge would wait on it for good. Once the partition is idle the runtime
    asks where records resume, skips to the end, and releases what waited."""
    import asyncio

    import streams.joiner.app as app_module
    from streams.joiner.app import JoinerAppConfig, JoinerRuntime
    from streams.joiner.pipeline import PipelineConfig
    from tests.streams.runtime_fakes import acked, consumed

    monkeypatch.setattr(app_module, "HOLE_CHECK_S", 0.0)
    msgs = consumed(events)
    runs = []

    def run(trailing_hole: int, first_offset: bool):
        runs.append(None)
        ends = {t: max(m.offset for m in msgs if m.topic == t) + 1 for t in {m.topic for m in msgs}}
        ends["feedback"] += trailing_hole

        async def send(topic, key, value, partition, headers):
            return acked(0)

        def first(topic, p, offset):
            return min((m.offset for m in msgs if m.topic == topic and m.offset >= offset), default=ends[topic])

        async def main():
            rt = JoinerRuntime(JoinerAppConfig(data_dir=tmp_path / f"run{len(runs)}", changelog=False,
                                               pipeline=PipelineConfig()),
                               send=send, read_back=lambda *a: [], seek=None,
                               caught_up=lambda topic, p, nxt: nxt >= ends.get(topic, 0),
                               first_offset=first if first_offset else None)
            try:
                await rt.position(0)
                await rt.handle(msgs)
                await rt.tick()
                return rt.counters(), rt.partitions[0].aligner.buffered()
            finally:
                rt.close()
        return asyncio.run(main())

    ref, ref_buffered = run(0, True)
    got, buffered = run(4, True)
    stuck, stuck_buffered = run(4, False)
    assert ref_buffered == buffered == 0
    assert got["source_offsets_skipped.feedback"] == 4
    assert {k: v for k, v in got.items() if not k.startswith("source_offsets")} == ref
    assert stuck_buffered > 0 and stuck["events"] < ref["events"]  # without the check: waiting


def test_worker_refuses_an_output_topic_with_fewer_partitions(broker):
    """The joiner writes partition p's outputs to partition p: an existing output topic with fewer
    partitions than the event topics (a hand-made cluster) is refused before anything is
    consumed, with the fix in the message."""
    from streams.contracts import EVENT_TOPICS
    from streams.joiner.worker import ensure_topics

    _create(broker.bootstrap, {**{t: 3 for t in EVENT_TOPICS}, "clicks.late": 1})
    with pytest.raises(ValueError, match=r"clicks.late has 1 partitions.*--partitions 3"):
        ensure_topics(broker.bootstrap)
