"""PartitionReader: the joiner's read-backs of its output topics and its changelog replays go
through one kafka-python client on the embedded broker (streams/joiner/readback.py)."""
from __future__ import annotations

import pytest
from kafka import KafkaProducer

from streams.joiner.changelog import HEADER_TAG, read_changelog
from streams.joiner.outputs import output_reader
from streams.joiner.readback import PartitionReader

TOPICS = [f"out{i}" for i in range(5)]


def _create(bootstrap: str, topics: dict[str, int]) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(t, num_partitions=n, replication_factor=1) for t, n in topics.items()])
    finally:
        admin.close()


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
    read_back = output_reader(reader)
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
