"""Kafka record batches (format v2, "magic 2") as raw bytes: header parsing, framing, CRC, timestamps.

The broker stores and serves batches exactly as producers sent them; only the fixed 61-byte header
is parsed on the hot path. Layout of the header (big-endian)::

    offset  size  field
         0     8  base_offset            (rewritten by the broker; outside the CRC)
         8     4  batch_length           (bytes after this field: batch size = 12 + batch_length)
        12     4  partition_leader_epoch (outside the CRC)
        16     1  magic                  (must be 2)
        17     4  crc                    (CRC-32C of bytes 21..end)
        21     2  attributes             (bits 0-2 compression, 3 timestamp type, 4 transactional,
                                          5 control)
        23     4  last_offset_delta
        27     8  base_timestamp
        35     8  max_timestamp
        43     8  producer_id
        51     2  producer_epoch
        53     4  base_sequence
        57     4  records_count

``crc32c`` uses aiokafka's compiled implementation when importable (about 1 GB/s; aiokafka is a
pinned dependency) and falls back to kafka-python's pure-Python table (about 8 MB/s).
``FAST_CRC32C`` says which one is in use.

``iter_record_timestamps`` decodes uncompressed batches and every codec kafka-python can decompress
in this environment (gzip always; snappy, lz4 and zstd only when their libraries are installed). For
any other codec it raises ``UnsupportedCompressionError``; callers then fall back to batch
granularity (the batch's base offset and max timestamp). Batches come from untrusted producers, so
decoding never allocates more than the batch itself plus ``max_uncompressed_bytes``: records are
yielded lazily (a LogAppendTime batch is not decoded at all), gzip and zstd inflate incrementally
and stop at the cap, and a payload larger than the cap is ``CorruptRecordError`` (snappy and lz4
are checked after inflating, as their decoders offer no cap). ``check_records_count`` rejects on
append a batch claiming more records than its payload can hold.

>>> empty = bytes(8) + (49).to_bytes(4, "big") + bytes(4) + bytes([2]) + bytes(44)
>>> h = parse_header(empty)
>>> (h.magic, h.size, h.records_count, h.compression)
(2, 61, 0, 0)
"""
from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from streams import StreamsError

try:  # compiled CRC-32C shipped with aiokafka
    from aiokafka.record._crecords import crc32c_cython as _crc32c_impl

    FAST_CRC32C = True
except ImportError:  # pragma: no cover - depends on the installed wheels
    from kafka.record._crc32c import crc as _crc32c_impl

    FAST_CRC32C = False

BATCH_HEADER_BYTES = 61
MAGIC_V2 = 2
LOG_OVERHEAD_BYTES = 12  # base_offset + batch_length: the part of a batch not counted in batch_length
MIN_BATCH_LENGTH = BATCH_HEADER_BYTES - LOG_OVERHEAD_BYTES  # 49: a header with no records
CRC_START = 21  # the CRC covers attributes .. end of batch
MIN_RECORD_BYTES = 7  # length, attributes, timestamp/offset delta, key/value length, header count
MAX_UNCOMPRESSED_BATCH_BYTES = 16 * 1024 * 1024  # cap on an inflated payload; LogConfig default
_INFLATE_CHUNK_BYTES = 1 << 20

COMPRESSION_NONE, COMPRESSION_GZIP, COMPRESSION_SNAPPY, COMPRESSION_LZ4, COMPRESSION_ZSTD = range(5)
ATTR_COMPRESSION_MASK = 0x07
ATTR_LOG_APPEND_TIME = 0x08
ATTR_TRANSACTIONAL = 0x10
ATTR_CONTROL = 0x20

_HEADER = struct.Struct(">qiibIhiqqqhii")
_BASE_OFFSET = struct.Struct(">q")
_LENGTH = struct.Struct(">i")


class CorruptRecordError(StreamsError):
    """Bytes that are not well-framed v2 record batches (bad magic, length, truncation or CRC)."""


class UnsupportedCompressionError(StreamsError):
    """A batch compressed with a codec whose library is not installed."""


@dataclass(frozen=True, slots=True)
class BatchHeader:
    """The fixed 61-byte header of a v2 record batch."""

    base_offset: int
    batch_length: int
    partition_leader_epoch: int
    magic: int
    crc: int
    attributes: int
    last_offset_delta: int
    base_timestamp: int
    max_timestamp: int
    producer_id: int
    producer_epoch: int
    base_sequence: int
    records_count: int

    @property
    def size(self) -> int:
        """Bytes the whole batch occupies on disk and on the wire."""
        return LOG_OVERHEAD_BYTES + self.batch_length

    @property
    def last_offset(self) -> int:
        return self.base_offset + self.last_offset_delta

    @property
    def compression(self) -> int:
        return self.attributes & ATTR_COMPRESSION_MASK

    @property
    def is_log_append_time(self) -> bool:
        return bool(self.attributes & ATTR_LOG_APPEND_TIME)

    @property
    def is_transactional(self) -> bool:
        return bool(self.attributes & ATTR_TRANSACTIONAL)

    @property
    def is_control(self) -> bool:
        return bool(self.attributes & ATTR_CONTROL)


def parse_header(buf: bytes | bytearray | memoryview, pos: int = 0) -> BatchHeader:
    """Parse the header of the batch starting at ``pos``.

    Raises ``CorruptRecordError`` when fewer than 61 bytes remain, the magic is not 2 or
    ``batch_length`` is smaller than a header. Does not check that the whole batch is present.
    """
    if pos < 0 or len(buf) - pos < BATCH_HEADER_BYTES:
        raise CorruptRecordError(
            f"truncated batch header at pos={pos}: {max(len(buf) - pos, 0)} < {BATCH_HEADER_BYTES} bytes"
        )
    header = BatchHeader(*_HEADER.unpack_from(buf, pos))
    if header.magic != MAGIC_V2:
        raise CorruptRecordError(f"magic={header.magic!r} at pos={pos}; only record batch v2 is supported")
    if header.batch_length < MIN_BATCH_LENGTH:
        raise CorruptRecordError(f"batch_length={header.batch_length!r} < {MIN_BATCH_LENGTH} at pos={pos}")
    return header


def iter_batches(buf: bytes | bytearray | memoryview) -> Iterator[tuple[int, BatchHeader]]:
    """Yield ``(position, header)`` for every batch in ``buf``, which must hold whole batches only.

    Raises ``CorruptRecordError`` on bad magic, a too-small ``batch_length`` or a truncated batch
    (also when trailing bytes are too few for a header). Checks framing only, not CRCs.
    """
    pos, end = 0, len(buf)
    while pos < end:
        header = parse_header(buf, pos)
        if pos + header.size > end:
            raise CorruptRecordError(
                f"truncated batch at pos={pos}: size={header.size} but only {end - pos} bytes remain"
            )
        yield pos, header
        pos += header.size


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli) of ``data``.

    >>> hex(crc32c(b"123456789"))
    '0xe3069283'
    """
    return _crc32c_impl(data)


def verify_crc(buf: bytes | bytearray | memoryview, pos: int = 0) -> bool:
    """Whether the CRC stored in the batch at ``pos`` matches its contents (framing must be valid)."""
    header = parse_header(buf, pos)
    end = pos + header.size
    if end > len(buf):
        raise CorruptRecordError(f"truncated batch at pos={pos}: size={header.size} > {len(buf) - pos} bytes")
    return crc32c(memoryview(buf)[pos + CRC_START : end]) == header.crc


def set_base_offset(buf: bytearray | memoryview, pos: int, base_offset: int) -> None:
    """Overwrite the base offset of the batch at ``pos`` in place (the CRC does not cover it)."""
    _BASE_OFFSET.pack_into(buf, pos, base_offset)


def batch_size_at(buf: bytes | bytearray | memoryview, pos: int) -> int:
    """Size of the batch at ``pos`` read from its length field alone (no validation)."""
    return LOG_OVERHEAD_BYTES + _LENGTH.unpack_from(buf, pos + 8)[0]


def _decode_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int]:
    """Zig-zag varint (Kafka's varint/varlong) -> (value, next position)."""
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise CorruptRecordError(f"truncated varint at pos={pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise CorruptRecordError(f"varint longer than 10 bytes ending at pos={pos}")


def check_records_count(header: BatchHeader, max_uncompressed_bytes: int = MAX_UNCOMPRESSED_BATCH_BYTES) -> None:
    """Raise ``CorruptRecordError`` when ``records_count`` cannot fit in the batch's payload.

    Every record takes at least ``MIN_RECORD_BYTES``: in the batch itself when uncompressed, in at
    most ``max_uncompressed_bytes`` once inflated. Bounds the work a forged count can cause later.
    """
    room = header.size - BATCH_HEADER_BYTES if header.compression == COMPRESSION_NONE else max_uncompressed_bytes
    if header.records_count * MIN_RECORD_BYTES > room:
        raise CorruptRecordError(
            f"records_count={header.records_count} cannot fit in {room} payload bytes "
            f"(compression={header.compression})"
        )


def _read_capped(read, cap: int, base_offset: int) -> bytes:
    """Read a decompressing stream to its end, failing once it yields more than ``cap`` bytes."""
    out = bytearray()
    while chunk := read(min(_INFLATE_CHUNK_BYTES, cap + 1 - len(out))):
        out += chunk
        if len(out) > cap:
            raise CorruptRecordError(f"batch base_offset={base_offset} inflates past {cap} bytes")
    return bytes(out)


def _gunzip_capped(data: bytes, cap: int, base_offset: int) -> bytes:
    """gzip members (concatenated, like ``GzipFile``) inflated with at most ``cap`` bytes of output."""
    import zlib

    out = bytearray()
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out += inflater.decompress(data, cap + 1 - len(out))
        if len(out) > cap or inflater.unconsumed_tail:
            raise CorruptRecordError(f"batch base_offset={base_offset} inflates past {cap} bytes")
        if not inflater.eof:
            raise CorruptRecordError(f"truncated gzip stream in batch base_offset={base_offset}")
        data = inflater.unused_data
    return bytes(out)


def _records_payload(
    batch: bytes | bytearray | memoryview, header: BatchHeader, cap: int,
) -> bytes | memoryview:
    body = memoryview(batch)[BATCH_HEADER_BYTES : header.size]
    codec = header.compression
    if codec == COMPRESSION_NONE:
        return body
    from kafka import codec as kafka_codec  # imported lazily: only compressed batches need it

    base = header.base_offset
    try:
        if codec == COMPRESSION_GZIP:
            return _gunzip_capped(bytes(body), cap, base)
        if codec == COMPRESSION_ZSTD and kafka_codec.has_zstd():
            import io

            reader = kafka_codec.zstd.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True)
            with reader:
                return _read_capped(reader.read, cap, base)
        payload = None
        if codec == COMPRESSION_SNAPPY and kafka_codec.has_snappy():
            payload = kafka_codec.snappy_decode(bytes(body))
        elif codec == COMPRESSION_LZ4 and kafka_codec.has_lz4():
            payload = kafka_codec.lz4_decode(bytes(body))
    except CorruptRecordError:
        raise
    except Exception as exc:  # codecs raise assorted library errors on garbage input
        raise CorruptRecordError(f"cannot decompress batch base_offset={base}: {exc}") from exc
    if payload is None:
        raise UnsupportedCompressionError(f"compression={codec!r} has no decoder installed")
    if len(payload) > cap:
        raise CorruptRecordError(f"batch base_offset={base} inflates past {cap} bytes")
    return payload


def iter_record_timestamps(
    batch: bytes | bytearray | memoryview, max_uncompressed_bytes: int = MAX_UNCOMPRESSED_BATCH_BYTES,
) -> Iterator[tuple[int, int]]:
    """``(absolute offset, timestamp)`` of each record in the single batch ``batch``, lazily.

    With LogAppendTime every record carries the batch's max timestamp, so nothing is decoded.
    Raises ``UnsupportedCompressionError`` for a codec that cannot be decoded here and
    ``CorruptRecordError`` for malformed records or a payload inflating past ``max_uncompressed_bytes``.
    """
    header = parse_header(batch, 0)
    if header.size > len(batch):
        raise CorruptRecordError(f"truncated batch: size={header.size} > {len(batch)} bytes")
    if header.is_log_append_time:
        for i in range(header.last_offset_delta + 1):
            yield header.base_offset + i, header.max_timestamp
        return
    payload = _records_payload(batch, header, max_uncompressed_bytes)
    pos = 0
    for _ in range(header.records_count):
        length, pos = _decode_varint(payload, pos)
        end = pos + length
        if length < 0 or end > len(payload):
            raise CorruptRecordError(f"record length={length} overruns batch base_offset={header.base_offset}")
        pos += 1  # record attributes (unused)
        ts_delta, pos = _decode_varint(payload, pos)
        offset_delta, pos = _decode_varint(payload, pos)
        yield header.base_offset + offset_delta, header.base_timestamp + ts_delta
        pos = end
