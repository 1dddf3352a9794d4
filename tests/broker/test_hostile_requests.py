"""Requests and batches built to exhaust the broker: forged record counts, gzip bombs, fetch
amplification, failed segment rolls and idle connections. Each must be answered (or refused) with
bounded memory while the broker keeps serving everyone else."""
from __future__ import annotations

import errno
import gzip
import os
import struct
import time
import tracemalloc

import pytest
from kafka.protocol.consumer import FetchRequest, ListOffsetsRequest

from streams.broker import EmbeddedBroker
from streams.broker import error_codes as ec
from streams.broker import partition_log as partition_log_mod
from streams.broker import segment as segment_mod
from streams.broker.config import BrokerConfig, LogConfig
from streams.broker.log import PartitionLog
from streams.broker.records import (
    ATTR_LOG_APPEND_TIME,
    BATCH_HEADER_BYTES,
    COMPRESSION_GZIP,
    crc32c,
    iter_record_timestamps,
)
from tests.broker.conftest import RawClient, make_batch, metadata_request, produce_raw, wait_for

MiB = 1024 * 1024


def forge(batch: bytes, *, attributes: int | None = None, records_count: int | None = None,
          payload: bytes | None = None) -> bytes:
    """``batch`` with header fields or the records payload replaced, length and CRC made valid again."""
    raw = bytearray(batch[:BATCH_HEADER_BYTES]) + (batch[BATCH_HEADER_BYTES:] if payload is None else payload)
    struct.pack_into(">i", raw, 8, len(raw) - 12)
    if attributes is not None:
        struct.pack_into(">h", raw, 21, attributes)
    if records_count is not None:
        struct.pack_into(">i", raw, 23, records_count - 1)  # last_offset_delta
        struct.pack_into(">i", raw, 57, records_count)
    struct.pack_into(">I", raw, 17, crc32c(bytes(raw[21:])))
    return bytes(raw)


def peak_alloc_bytes(fn) -> tuple[object, int]:
    """``fn()`` and the peak of Python allocations while it ran."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def list_offsets(client: RawClient, topic: str, timestamp: int):
    T = ListOffsetsRequest.ListOffsetsTopic
    request = ListOffsetsRequest(replica_id=-1, isolation_level=0, topics=[T(name=topic, partitions=[
        T.ListOffsetsPartition(partition_index=0, current_leader_epoch=-1, timestamp=timestamp)])])
    return client.request(request, 7).topics[0].partitions[0]


def fetch(topic: str, partition_max_bytes: list[int], max_bytes: int = 0) -> FetchRequest:
    """Fetch v11 naming partition 0 of ``topic`` once per entry of ``partition_max_bytes``."""
    P = FetchRequest.FetchTopic.FetchPartition
    parts = [P(partition=0, current_leader_epoch=-1, fetch_offset=0, log_start_offset=-1, partition_max_bytes=m)
             for m in partition_max_bytes]
    return FetchRequest(
        replica_id=-1, max_wait_ms=0, min_bytes=0, max_bytes=max_bytes, isolation_level=0, session_id=0,
        session_epoch=-1, topics=[FetchRequest.FetchTopic(topic=topic, partitions=parts)], forgotten_topics_data=[],
        rack_id="",
    )


@pytest.fixture
def small_broker(tmp_path):
    """A broker with a 256 KiB fetch cap and a 300 ms idle timeout."""
    config = BrokerConfig(data_dir=tmp_path / "broker", port=0, fetch_max_bytes=256 * 1024,
                          connections_max_idle_ms=300)
    with EmbeddedBroker(config) as b:
        yield b


# --- 1. forged record counts and decompression bombs ------------------------------------------
@pytest.mark.parametrize("attributes, records_count", [
    pytest.param(ATTR_LOG_APPEND_TIME, 5_000_000, id="log-append-time-5M"),
    pytest.param(0, 2**31 - 1, id="uncompressed-int32-max"),
    pytest.param(COMPRESSION_GZIP, 2**31 - 1, id="gzip-int32-max"),
])
def test_records_count_that_cannot_fit_is_rejected_on_produce(broker, raw_client, attributes, records_count):
    client = raw_client()
    client.request(metadata_request(["forged"]), 9)
    batch = make_batch(-1, -1, -1, [b"v"])
    if attributes & COMPRESSION_GZIP:
        batch = forge(batch, payload=gzip.compress(batch[BATCH_HEADER_BYTES:]))
    forged = forge(batch, attributes=attributes, records_count=records_count)
    assert len(forged) < 200
    assert produce_raw(client, "forged", forged).error_code == ec.CORRUPT_MESSAGE
    assert broker.broker.logs.get("forged", 0).log_end_offset == 0
    assert list_offsets(client, "forged", 0).offset == -1
    assert produce_raw(client, "forged", make_batch(-1, -1, -1, [b"ok"])).error_code == ec.NONE


def test_timestamp_lookup_on_a_stored_log_append_time_batch_allocates_nothing_per_record(tmp_path):
    """A batch stored before the append check existed: lookups must not build one entry per record."""
    directory = tmp_path / "p"
    directory.mkdir()
    forged = forge(make_batch(-1, -1, -1, [b"v"]), attributes=ATTR_LOG_APPEND_TIME, records_count=1_000_000)
    (directory / f"{0:020d}.log").write_bytes(forged)
    log = PartitionLog(directory, LogConfig(fsync="never"))
    assert log.log_end_offset == 1_000_000
    max_ts = struct.unpack_from(">q", forged, 35)[0]
    found, peak = peak_alloc_bytes(lambda: (log.offset_for_timestamp(0), log.max_timestamp_offset()))
    assert found == ((0, max_ts), (0, max_ts))
    assert peak < 1 * MiB, f"peak={peak} bytes"
    log.close()


def test_gzip_bomb_is_inflated_only_up_to_the_cap(tmp_path):
    batch = make_batch(-1, -1, -1, [b"v"])
    bomb = forge(batch, attributes=COMPRESSION_GZIP, payload=gzip.compress(bytes(16 * MiB), 9))
    assert len(bomb) < 64 * 1024
    log = PartitionLog(tmp_path / "p", LogConfig(fsync="never", max_uncompressed_batch_bytes=1 * MiB))
    log.append(bomb)
    max_ts = struct.unpack_from(">q", bomb, 35)[0]
    found, peak = peak_alloc_bytes(lambda: log.offset_for_timestamp(0))
    assert found == (0, max_ts)  # undecodable within the cap: batch granularity
    assert peak < 3 * MiB, f"peak={peak} bytes"
    log.close()


def test_concatenated_gzip_members_still_decode():
    batch = make_batch(-1, -1, -1, [b"a", b"b", b"c"])
    records = batch[BATCH_HEADER_BYTES:]
    split = forge(batch, attributes=COMPRESSION_GZIP,
                  payload=gzip.compress(records[:5]) + gzip.compress(records[5:]))
    assert list(iter_record_timestamps(split)) == list(iter_record_timestamps(batch))


# --- 2. fetch amplification ---------------------------------------------------------------------
def test_fetch_is_capped_and_a_repeated_partition_is_read_once(small_broker):
    client = RawClient(small_broker.bootstrap)
    try:
        client.request(metadata_request(["amplify"]), 9)
        for i in range(16):
            assert produce_raw(client, "amplify", make_batch(-1, -1, -1, [os.urandom(32 * 1024)])).error_code == 0
        response = client.request(fetch("amplify", [100 * MiB] * 20), 11)
        parts = response.responses[0].partitions
        sizes = [len(p.records or b"") for p in parts]
        assert [p.error_code for p in parts] == [ec.NONE] * 20
        assert all(p.high_watermark == 16 for p in parts)
        assert 0 < sizes[0] <= 256 * 1024 and sizes[1:] == [0] * 19, sizes
    finally:
        client.close()


def test_negative_partition_max_bytes_is_answered_not_fatal(small_broker):
    client = RawClient(small_broker.bootstrap)
    try:
        client.request(metadata_request(["negative"]), 9)
        first = make_batch(-1, -1, -1, [b"a"])
        assert produce_raw(client, "negative", first).error_code == 0
        assert produce_raw(client, "negative", make_batch(-1, -1, -1, [b"b"])).error_code == 0
        part = client.request(fetch("negative", [-1]), 11).responses[0].partitions[0]
        assert part.error_code == ec.NONE and len(part.records) == len(first)  # as for 0: one batch (KIP-74)
        assert small_broker.broker.counters["connections", "handler_error"] == 0
    finally:
        client.close()


# --- 3. a failed segment roll -------------------------------------------------------------------
def _fill_until_roll(log: PartitionLog, batch: bytes) -> None:
    while log._segments[-1].size + len(batch) <= log.config.segment_bytes:
        log.append(batch)


def _n_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("failure", ["segment-constructor", "open-timeindex", "fsync-on-seal"])
def test_failed_roll_leaves_the_partition_writable(tmp_path, monkeypatch, failure):
    fsync = "interval" if failure == "fsync-on-seal" else "never"
    fds = _n_fds()
    log = PartitionLog(tmp_path / "p", LogConfig(segment_bytes=1024, fsync=fsync), now_ms=lambda: 1_000_000)
    batch = make_batch(-1, -1, -1, [b"x" * 200])
    _fill_until_roll(log, batch)
    n_before = log.log_end_offset
    armed = [True]

    def fail_once() -> None:
        if armed[0]:
            armed[0] = False
            raise OSError(errno.EMFILE if failure != "fsync-on-seal" else errno.EIO, "injected")

    if failure == "segment-constructor":
        real_segment = partition_log_mod.Segment

        def segment(*args, **kwargs):
            fail_once()
            return real_segment(*args, **kwargs)
        monkeypatch.setattr(partition_log_mod, "Segment", segment)
    elif failure == "open-timeindex":
        real_open = os.open

        def open_(path, *args, **kwargs):
            if str(path).endswith(".timeindex"):
                fail_once()
            return real_open(path, *args, **kwargs)
        monkeypatch.setattr(segment_mod.os, "open", open_)
    else:
        real_fsync = segment_mod.Segment.fsync

        def fsync_(self):
            fail_once()
            real_fsync(self)
        monkeypatch.setattr(segment_mod.Segment, "fsync", fsync_)

    with pytest.raises(OSError, match="injected"):
        log.append(batch)
    for _ in range(8):
        log.append(batch)
    assert log.log_end_offset == n_before + 8 and log.n_segments >= 2
    assert _n_fds() - fds == log.n_segments + 2  # nothing leaked by the half-done roll
    sealed = log._segments[0]
    assert len(sealed.time_ts) == len(sealed.idx_offsets) + 1  # exactly one final entry
    assert os.path.getsize(sealed.stem.with_suffix(".timeindex")) == 12 * len(sealed.time_ts)
    log.close()
    reopened = PartitionLog(tmp_path / "p", LogConfig(segment_bytes=1024, fsync="never"))
    assert reopened.log_end_offset == n_before + 8
    assert [reopened.read(o, 1 << 20)[:8] for o in range(reopened.log_end_offset)] == [
        struct.pack(">q", o) for o in range(reopened.log_end_offset)
    ]
    reopened.close()


# --- 4. idle connections ------------------------------------------------------------------------
def test_idle_connection_is_closed_but_a_long_poll_is_not(small_broker):
    idle = RawClient(small_broker.bootstrap)
    polling = RawClient(small_broker.bootstrap)
    try:
        polling.request(metadata_request(["quiet"]), 9)
        t0 = time.monotonic()
        request = fetch("quiet", [1024])
        request.max_wait_ms, request.min_bytes = 1500, 1
        part = polling.request(request, 11).responses[0].partitions[0]
        assert time.monotonic() - t0 >= 1.4 and part.error_code == ec.NONE  # parked 5x the idle timeout
        assert polling.request(metadata_request(["quiet"]), 9).topics[0].error_code == ec.NONE
        assert idle.is_closed_by_peer(timeout_s=5)
        wait_for(lambda: small_broker.broker.counters["connections", "idle_closed"] >= 1, 5, what="idle close")
    finally:
        idle.close()
        polling.close()
