"""Value encodings: fixed struct headers and little-endian numpy columns. No pickle.

Every value starts with a one-byte format version (``VERSION = 1``); a decoder checks the version
and the exact length and raises :class:`~featurestore.CodecError` with the reason otherwise.

==============  ==========================================================================
value           layout (little-endian)
==============  ==========================================================================
offset          version u8, next_offset i64                                           9 B
commit          commit_seq u64, max_event_ts_ms i64, wall_ms i64                      25 B
sequence        n u16, n_dropped u32, then columns ts_ms i64[n], item_id u64[n],
                category i32[n]                                              7 + 20 n B
counter         n u16, newest_bucket i64, n_dropped u32, then bucket i64[n],
                count u32[n] (non-empty buckets only, ascending)            15 + 12 n B
item counts     impressions, clicks, likes, dislikes: u64 each                        33 B
dwell stats     half_life_ms f64 (0 = no decay), ref_ts_ms i64, weight f64,
                mean f64, m2 f64, n u64                                                49 B
sketch          magic "DQ", format u8 (1), k u16, n u64, n_levels u8, then
                length u32[L], n_compactions u64[L], values f32 (level 0 first, each
                level in its stored order)                          15 + 12 L + 4 m B
==============  ==========================================================================

>>> decode_offset(encode_offset(41))
41
>>> ts, items, cats, dropped = decode_sequence(encode_sequence([5, 9], [7, 8], [1, -1], 0))
>>> ts.tolist(), items.tolist(), cats.tolist(), dropped
([5, 9], [7, 8], [1, -1], 0)
>>> decode_offset(b"\\x01\\x00")
Traceback (most recent call last):
...
featurestore.CodecError: bad_length: offset is 2 bytes (expected 9)
"""
from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence

import numpy as np

from featurestore import CodecError

VERSION = 1
_OFFSET = struct.Struct("<Bq")
_COMMIT = struct.Struct("<BQqq")
_SEQ_HEAD = struct.Struct("<BHI")
_CNT_HEAD = struct.Struct("<BHqI")
_ITEM_COUNTS = struct.Struct("<B4Q")
_DWELL = struct.Struct("<BdqdddQ")


# Native column arrays for the aggregates' hot paths: ``array.array`` reads and writes the stored
# little-endian columns as raw bytes (swapped on a big-endian machine).
I64, U64 = "q", "Q"
I32, U32 = (next(c for c in codes if array(c).itemsize == 4) for codes in (("i", "l"), ("I", "L")))
_SWAP = sys.byteorder != "little"


if _SWAP:
    def column(code: str, data: bytes) -> array:
        """A native array of typecode ``code`` from little-endian ``bytes``."""
        col = array(code, data)
        col.byteswap()
        return col

    def column_bytes(col: array) -> bytes:
        """The little-endian bytes of a native array."""
        col = array(col.typecode, col)
        col.byteswap()
        return col.tobytes()
else:
    # little-endian: the constructor and ``tobytes`` are the whole job (C calls, no Python frame);
    # ``data`` must be bytes or bytearray (a memoryview would be read as an iterable of ints)
    column = array
    column_bytes = array.tobytes


def _check_version(kind: str, data: bytes) -> None:
    if not data:
        raise CodecError(f"bad_length: {kind} is 0 bytes")
    if data[0] != VERSION:
        raise CodecError(f"unknown_version: {kind} version {data[0]} (this build reads {VERSION})")


def _unpack(kind: str, fmt: struct.Struct, data: bytes) -> tuple:
    _check_version(kind, data)
    if len(data) != fmt.size:
        raise CodecError(f"bad_length: {kind} is {len(data)} bytes (expected {fmt.size})")
    return fmt.unpack(data)[1:]


def encode_offset(offset: int) -> bytes:
    return _OFFSET.pack(VERSION, offset)


def decode_offset(data: bytes) -> int:
    return _unpack("offset", _OFFSET, data)[0]


def encode_commit(commit_seq: int, max_event_ts_ms: int, wall_ms: int) -> bytes:
    return _COMMIT.pack(VERSION, commit_seq, max_event_ts_ms, wall_ms)


def decode_commit(data: bytes) -> tuple[int, int, int]:
    """``(commit_seq, max_event_ts_ms, wall_ms)``."""
    return _unpack("commit", _COMMIT, data)


def encode_sequence(ts_ms: Sequence[int], item_ids: Sequence[int], categories: Sequence[int],
                    n_dropped: int) -> bytes:
    n = len(ts_ms)
    if not n == len(item_ids) == len(categories):
        raise CodecError(f"ragged sequence columns: {n}, {len(item_ids)}, {len(categories)}")
    return b"".join((
        encode_sequence_header(n, n_dropped),
        np.asarray(ts_ms, dtype="<i8").tobytes(),
        np.asarray(item_ids, dtype="<u8").tobytes(),
        np.asarray(categories, dtype="<i4").tobytes(),
    ))


def sequence_header(data: bytes) -> tuple[int, int]:
    """``(n, n_dropped)`` of an encoded sequence after checking its version and exact length; the
    columns start at ``SEQUENCE_HEADER_BYTES``."""
    _check_version("sequence", data)
    if len(data) < _SEQ_HEAD.size:
        raise CodecError(f"bad_length: sequence is {len(data)} bytes (< {_SEQ_HEAD.size})")
    _, n, n_dropped = _SEQ_HEAD.unpack_from(data)
    expected = _SEQ_HEAD.size + 20 * n
    if len(data) != expected:
        raise CodecError(f"bad_length: sequence of {n} is {len(data)} bytes (expected {expected})")
    return n, n_dropped


def encode_sequence_header(n: int, n_dropped: int) -> bytes:
    """The header that :func:`encode_sequence` writes before the columns."""
    return _SEQ_HEAD.pack(VERSION, n, min(n_dropped, 0xFFFFFFFF))


SEQUENCE_HEADER_BYTES = _SEQ_HEAD.size


def decode_sequence(data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(ts_ms i64[n], item_id u64[n], category i32[n], n_dropped)``, oldest first."""
    n, n_dropped = sequence_header(data)
    off = _SEQ_HEAD.size
    ts = np.frombuffer(data, dtype="<i8", count=n, offset=off)
    items = np.frombuffer(data, dtype="<u8", count=n, offset=off + 8 * n)
    cats = np.frombuffer(data, dtype="<i4", count=n, offset=off + 16 * n)
    return ts, items, cats, n_dropped


def encode_counter(buckets: Sequence[int], counts: Sequence[int], newest_bucket: int,
                   n_dropped: int) -> bytes:
    n = len(buckets)
    if n != len(counts):
        raise CodecError(f"ragged counter columns: {n}, {len(counts)}")
    try:  # one pack for header and columns (a windowed counter holds a few ints)
        return struct.pack(f"<BHqI{n}q{n}I", VERSION, n, newest_bucket, min(n_dropped, 0xFFFFFFFF),
                           *buckets, *counts)
    except struct.error as exc:
        raise OverflowError(f"counter value out of range: {exc}") from None


def counter_header(data: bytes) -> tuple[int, int, int]:
    """``(n, newest_bucket, n_dropped)`` of an encoded counter after checking its version and exact
    length; the columns start at ``COUNTER_HEADER_BYTES``."""
    _check_version("counter", data)
    if len(data) < _CNT_HEAD.size:
        raise CodecError(f"bad_length: counter is {len(data)} bytes (< {_CNT_HEAD.size})")
    _, n, newest, n_dropped = _CNT_HEAD.unpack_from(data)
    expected = _CNT_HEAD.size + 12 * n
    if len(data) != expected:
        raise CodecError(f"bad_length: counter of {n} is {len(data)} bytes (expected {expected})")
    return n, newest, n_dropped


COUNTER_HEADER_BYTES = _CNT_HEAD.size


def decode_counter(data: bytes) -> tuple[np.ndarray, np.ndarray, int, int]:
    """``(bucket i64[n], count u32[n], newest_bucket, n_dropped)``."""
    n, newest, n_dropped = counter_header(data)
    buckets = np.frombuffer(data, dtype="<i8", count=n, offset=_CNT_HEAD.size)
    counts = np.frombuffer(data, dtype="<u4", count=n, offset=_CNT_HEAD.size + 8 * n)
    return buckets, counts, newest, n_dropped


def encode_item_counts(counts: Sequence[int]) -> bytes:
    if len(counts) != 4:
        raise CodecError(f"item counts need 4 totals, got {len(counts)}")
    return _ITEM_COUNTS.pack(VERSION, *counts)


def decode_item_counts(data: bytes) -> tuple[int, int, int, int]:
    return _unpack("item_counts", _ITEM_COUNTS, data)


def encode_dwell_stats(half_life_ms: float, ref_ts_ms: int, weight: float, mean: float, m2: float,
                       n: int) -> bytes:
    return _DWELL.pack(VERSION, half_life_ms, ref_ts_ms, weight, mean, m2, n)


def decode_dwell_stats(data: bytes) -> tuple[float, int, float, float, float, int]:
    """``(half_life_ms, ref_ts_ms, weight, mean, m2, n)``."""
    return _unpack("dwell_stats", _DWELL, data)


SKETCH_MAGIC = b"DQ"
SKETCH_FORMAT = 1
_SKETCH_HEAD = struct.Struct("<B2sBHQB")
_KLL_FAMILY = 15  # byte 2 of a DataSketches KLL serialization


def encode_sketch(k: int, n: int, n_compactions: Sequence[int],
                  levels: Sequence[np.ndarray]) -> bytes:
    """A :class:`~featurestore.sketches.DwellSketch` state: level ``h`` holds values of weight
    ``2**h``, written in their current order (lossless)."""
    n_levels = len(levels)
    if len(n_compactions) != n_levels or not 1 <= n_levels <= 64:
        raise CodecError(f"sketch with {n_levels} levels and {len(n_compactions)} counters")
    # struct for the small header columns: a numpy array per column cost more than the values
    return b"".join((
        _SKETCH_HEAD.pack(VERSION, SKETCH_MAGIC, SKETCH_FORMAT, k, n, n_levels),
        struct.pack(f"<{n_levels}I{n_levels}Q", *map(len, levels), *n_compactions),
        *(np.asarray(v, dtype="<f4").tobytes() for v in levels),
    ))


def decode_sketch(data: bytes) -> tuple[int, int, list[int], list[np.ndarray]]:
    """``(k, n, n_compactions, levels)`` as :func:`encode_sketch` wrote them (levels are f32)."""
    _check_version("sketch", data)
    if data[1:3] != SKETCH_MAGIC:
        if len(data) >= 4 and data[3] == _KLL_FAMILY:
            raise CodecError("old_format: sketch is a DataSketches KLL sketch, written by an older "
                             "store; rebuild the store")
        raise CodecError(f"bad_magic: sketch starts {bytes(data[1:3])!r} "
                         f"(expected {SKETCH_MAGIC!r})")
    if len(data) < _SKETCH_HEAD.size:
        raise CodecError(f"bad_length: sketch is {len(data)} bytes (< {_SKETCH_HEAD.size})")
    _, _, fmt, k, n, n_levels = _SKETCH_HEAD.unpack_from(data)
    if fmt != SKETCH_FORMAT:
        raise CodecError(f"unknown_version: sketch format {fmt} (this build reads {SKETCH_FORMAT})")
    if not 1 <= n_levels <= 64:
        raise CodecError(f"bad_sketch: {n_levels} levels")
    off = _SKETCH_HEAD.size
    if len(data) < off + 12 * n_levels:
        raise CodecError(f"bad_length: sketch of {n_levels} levels is {len(data)} bytes")
    columns = struct.unpack_from(f"<{n_levels}I{n_levels}Q", data, off)
    lengths, counts = list(columns[:n_levels]), list(columns[n_levels:])
    off += 12 * n_levels
    n_values = sum(lengths)
    if len(data) != off + 4 * n_values:
        raise CodecError(f"bad_length: sketch is {len(data)} bytes (expected {off + 4 * n_values})")
    values = np.frombuffer(data, dtype="<f4", count=n_values, offset=off).astype(np.float32)
    if n_values and not (values >= 0).all():
        raise CodecError("bad_sketch: negative or nan values")
    levels, start = [], 0
    for m in lengths:
        levels.append(values[start:start + m])
        start += m
    return k, n, counts, levels
