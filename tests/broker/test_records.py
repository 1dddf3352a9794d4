"""Record batch v2 header parsing, framing, CRC and timestamp decoding against kafka-python's codec."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.record._crc32c import crc as crc32c_reference
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from streams.broker.records import (
    ATTR_LOG_APPEND_TIME,
    BATCH_HEADER_BYTES,
    COMPRESSION_GZIP,
    COMPRESSION_NONE,
    COMPRESSION_SNAPPY,
    CorruptRecordError,
    UnsupportedCompressionError,
    crc32c,
    iter_batches,
    iter_record_timestamps,
    parse_header,
    set_base_offset,
    verify_crc,
)


def make_batch(
    values: list[bytes],
    ts: list[int] | int = 1_000,
    *,
    compression: int = COMPRESSION_NONE,
    producer_id: int = -1,
    transactional: bool = False,
    keys: list[bytes | None] | None = None,
) -> bytes:
    """A real v2 batch built by kafka-python (base offset 0, as a producer sends it)."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=compression,
        is_transactional=transactional,
        producer_id=producer_id,
        producer_epoch=0 if producer_id >= 0 else -1,
        base_sequence=0 if producer_id >= 0 else -1,
        batch_size=1 << 30,
    )
    stamps = ts if isinstance(ts, list) else [ts + i for i in range(len(values))]
    for i, value in enumerate(values):
        key = keys[i] if keys is not None else b"k%d" % i
        builder.append(i, timestamp=stamps[i], key=key, value=value, headers=[("h", b"x")])
    return bytes(builder.build())


def test_header_fields_match_kafka_python():
    raw = make_batch([b"a", b"bb", b"ccc"], ts=[5, 9, 7])
    h = parse_header(raw)
    ref = DefaultRecordBatch(bytearray(raw))
    assert h.size == len(raw) == ref.size_in_bytes
    assert (h.base_offset, h.magic, h.crc) == (0, 2, ref.crc)
    assert (h.last_offset_delta, h.records_count) == (2, 3)
    assert (h.base_timestamp, h.max_timestamp) == (5, 9)
    assert (h.producer_id, h.producer_epoch, h.base_sequence) == (-1, -1, -1)
    assert h.compression == COMPRESSION_NONE
    assert not h.is_transactional and not h.is_control and not h.is_log_append_time


def test_header_flags():
    h = parse_header(make_batch([b"x" * 500], compression=COMPRESSION_GZIP, producer_id=7, transactional=True))
    assert h.compression == COMPRESSION_GZIP
    assert h.is_transactional and not h.is_control
    assert (h.producer_id, h.producer_epoch, h.base_sequence) == (7, 0, 0)


def test_crc32c_known_vector_and_reference():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    data = bytes(range(256)) * 7
    assert crc32c(data) == crc32c_reference(data)
    assert crc32c(memoryview(data)[3:]) == crc32c_reference(data[3:])


def test_verify_crc_detects_payload_change_but_not_base_offset_rewrite():
    raw = bytearray(make_batch([b"hello", b"world"]))
    assert verify_crc(raw, 0)
    set_base_offset(raw, 0, 123_456_789)
    assert verify_crc(raw, 0), "base offset lies outside the CRC"
    assert parse_header(raw).base_offset == 123_456_789
    raw[-1] ^= 0x01
    assert not verify_crc(raw, 0)


def test_iter_batches_positions():
    a, b = make_batch([b"a"]), make_batch([b"b", b"c"])
    found = [(pos, h.records_count) for pos, h in iter_batches(a + b + a)]
    assert found == [(0, 1), (len(a), 2), (len(a) + len(b), 1)]
    assert list(iter_batches(b"")) == []


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda raw: raw[:-1], "truncated batch"),
        (lambda raw: raw + b"\x00" * 10, "truncated batch header"),
        (lambda raw: raw[:16] + b"\x01" + raw[17:], "magic=1"),
        (lambda raw: raw[:8] + struct.pack(">i", 10) + raw[12:], "batch_length=10"),
        (lambda raw: raw[:30], "truncated batch header"),
    ],
)
def test_iter_batches_rejects_bad_framing(mutate, message):
    raw = make_batch([b"payload"])
    with pytest.raises(CorruptRecordError, match=message):
        list(iter_batches(raw + mutate(raw)))


def test_record_timestamps_uncompressed_and_gzip():
    stamps = [100, 50, 400, 399, 10_000]
    for compression in (COMPRESSION_NONE, COMPRESSION_GZIP):
        raw = bytearray(make_batch([b"v" * 300] * 5, ts=stamps, compression=compression))
        assert parse_header(raw).compression == compression
        set_base_offset(raw, 0, 40)
        assert list(iter_record_timestamps(raw)) == [(40 + i, t) for i, t in enumerate(stamps)]


def test_record_timestamps_log_append_time_uses_max_timestamp():
    raw = bytearray(make_batch([b"a", b"b"], ts=[1, 2]))
    struct.pack_into(">h", raw, 21, ATTR_LOG_APPEND_TIME)
    struct.pack_into(">q", raw, 35, 777)
    assert list(iter_record_timestamps(raw)) == [(0, 777), (1, 777)]


def test_record_timestamps_unknown_codec_raises():
    raw = bytearray(make_batch([b"a"]))
    struct.pack_into(">h", raw, 21, COMPRESSION_SNAPPY)
    from kafka import codec

    if codec.has_snappy():
        pytest.skip("snappy installed: the payload would be decoded (and rejected as garbage)")
    with pytest.raises(UnsupportedCompressionError):
        list(iter_record_timestamps(raw))


def test_record_timestamps_rejects_overrunning_record():
    raw = bytearray(make_batch([b"abc"]))
    raw[BATCH_HEADER_BYTES] = 0x7E  # record length varint 63: longer than the batch
    with pytest.raises(CorruptRecordError, match="overruns"):
        list(iter_record_timestamps(raw))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.binary(max_size=300), st.integers(0, 2**41), st.one_of(st.none(), st.binary(max_size=20))),
        min_size=1,
        max_size=30,
    ),
    st.integers(0, 2**40),
    st.sampled_from([COMPRESSION_NONE, COMPRESSION_GZIP]),
)
def test_record_timestamps_match_kafka_python_decoder(records, base_offset, compression):
    raw = bytearray(
        make_batch(
            [v for v, _, _ in records],
            ts=[t for _, t, _ in records],
            keys=[k for _, _, k in records],
            compression=compression,
        )
    )
    set_base_offset(raw, 0, base_offset)
    assert verify_crc(raw, 0)
    expected = [(r.offset, r.timestamp) for r in DefaultRecordBatch(bytearray(raw))]
    assert list(iter_record_timestamps(raw)) == expected


def test_module_doctests():
    import doctest

    from streams.broker import records

    result = doctest.testmod(records)
    assert result.attempted >= 3 and result.failed == 0
