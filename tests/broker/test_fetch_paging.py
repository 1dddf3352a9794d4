"""Property: paging through a partition with Fetch, any byte limits, yields every record once, in order."""
from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.protocol.consumer import FetchRequest
from kafka.record import MemoryRecords

from tests.broker.conftest import RawClient, make_batch, metadata_request, produce_raw

_topic_ids = itertools.count()


def _fetch(topic: str, offset: int, partition_max_bytes: int, max_bytes: int) -> FetchRequest:
    part = FetchRequest.FetchTopic.FetchPartition(
        partition=0, current_leader_epoch=-1, fetch_offset=offset, last_fetched_epoch=-1, log_start_offset=-1,
        partition_max_bytes=partition_max_bytes,
    )
    return FetchRequest(
        replica_id=-1, max_wait_ms=0, min_bytes=0, max_bytes=max_bytes, isolation_level=0, session_id=0,
        session_epoch=-1, topics=[FetchRequest.FetchTopic(topic=topic, partitions=[part])], forgotten_topics_data=[],
        rack_id="",
    )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch_sizes=st.lists(st.integers(1, 12), min_size=1, max_size=15),
    value_bytes=st.integers(0, 300),
    partition_max_bytes=st.integers(1, 4000),
    max_bytes=st.integers(1, 8000),
    start=st.integers(0, 50),
    version=st.sampled_from([4, 7, 11, 12]),
)
def test_fetch_pages_through_everything_in_order(broker, batch_sizes, value_bytes, partition_max_bytes, max_bytes,
                                                 start, version):
    topic = f"paging-{next(_topic_ids)}"
    client = RawClient(broker.bootstrap)
    try:
        client.request(metadata_request([topic]), 9)
        produced: list[bytes] = []
        for n in batch_sizes:
            values = [f"{len(produced) + i}:".encode().ljust(value_bytes, b".") for i in range(n)]
            assert produce_raw(client, topic, make_batch(-1, -1, -1, values)).error_code == 0
            produced.extend(values)
        start = min(start, len(produced))
        offset, seen = start, []
        while offset < len(produced):
            response = client.request(_fetch(topic, offset, partition_max_bytes, max_bytes), version)
            part = response.responses[0].partitions[0]
            assert part.error_code == 0 and part.high_watermark == len(produced)
            assert part.records, "a fetch below the high watermark must return at least one batch (KIP-74)"
            records = MemoryRecords(bytes(part.records))
            got_any = False
            while records.has_next():
                batch = records.next_batch()
                for record in batch:
                    if record.offset >= offset:  # the first batch may start before the fetch offset
                        assert record.offset == offset
                        seen.append(record.value)
                        offset += 1
                        got_any = True
            assert got_any
        assert seen == produced[start:]
    finally:
        client.close()
