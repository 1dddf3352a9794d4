"""The only key encoder of the feature store. Every key the store writes or reads is built here.

Layout: a one-byte family prefix, then fixed-width fields. Ids are unsigned big-endian, so byte
order equals numeric order and "every key of one family", "the sequences of one user" and "the
counters of one user" are each one contiguous range (a prefix scan; see :func:`prefix_range`). The
keys of one user are NOT one range: the sequences lie under USER_SEQUENCE + user_id
(:func:`user_prefix`), the counters under USER_COUNTER + user_id; :func:`user_row_keys` lists all
of them for one multi-get.

=============  ======  ==================================================  ===========================
family         prefix  key bytes after the prefix                          value (featurestore.codecs)
=============  ======  ==================================================  ===========================
META           0x01    name, ascii (``b"commit"``, ``b"layout"``)           commit record; layout JSON
OFFSET         0x02    topic utf-8 | 0x00 | partition u32 BE                next offset to consume
USER_SEQUENCE  0x10    user_id u64 BE | kind u8 (:class:`SequenceKind`)     bounded sequence
USER_COUNTER   0x11    user_id u64 BE | counter u8 (:class:`CounterKind`)   event-time buckets
ITEM_SKETCH    0x20    item_id u64 BE                                       dwell quantile sketch
ITEM_COUNTS    0x21    item_id u64 BE                                       four u64 totals
GLOBAL_DWELL   0x30    shard u32 BE                                         ln(dwell) moments partial
JOIN_STATE     0x40    kind u8 (:class:`JoinStateKind`) | impression u64 BE  the joiner's per-record state
=============  ======  ==================================================  ===========================

Offsets are partition-scoped: one key per ``(topic, partition)``. Kafka topic names use only
``[A-Za-z0-9._-]``, so the 0x00 terminator cannot occur inside a topic and all partitions of one
topic form a prefix range. The global dwell statistics are stored as one partial per writer shard
and merged on read, so several joiner workers can share one aggregate. JOIN_STATE holds the join
core of the partition that writes the store (``streams.joiner.join``): one key per pending
impression, per impression id with outcomes waiting for it, per emitted impression still retained,
and a header (kind 0, id 0), so a commit writes what changed rather than the whole state.

>>> user_sequence_key(42, SequenceKind.CLICK).hex()
'10000000000000002a01'
>>> decode_key(offset_key("clicks", 3))
(<Family.OFFSET: 2>, ('clicks', 3))
>>> user_prefix(1) < user_sequence_key(1, SequenceKind.DISLIKE) < user_prefix(2)
True
>>> item_sketch_key(-1)
Traceback (most recent call last):
...
featurestore.KeyEncodingError: item_id=-1 out of range [0, 18446744073709551615]
"""
from __future__ import annotations

import operator
import re
import struct
from enum import IntEnum

from featurestore import KeyEncodingError


class Family(IntEnum):
    META = 0x01
    OFFSET = 0x02
    USER_SEQUENCE = 0x10
    USER_COUNTER = 0x11
    ITEM_SKETCH = 0x20
    ITEM_COUNTS = 0x21
    GLOBAL_DWELL = 0x30
    JOIN_STATE = 0x40


class JoinStateKind(IntEnum):
    """The records of the join core's state (``streams.joiner.join``)."""

    HEADER = 0
    PENDING = 1
    WAITING = 2
    EMITTED = 3


class SequenceKind(IntEnum):
    """The four per-user behaviour sequences; unclick = an impression that closed without a click."""

    CLICK = 1
    UNCLICK = 2
    LIKE = 3
    DISLIKE = 4


class CounterKind(IntEnum):
    CLICK = 1
    IMPRESSION = 2


class ItemCountField(IntEnum):
    """Positions of the per-item totals inside the ITEM_COUNTS value."""

    IMPRESSIONS = 0
    CLICKS = 1
    LIKES = 2
    DISLIKES = 3


U64_MAX = 2**64 - 1
U32_MAX = 2**32 - 1
I32_MAX = 2**31 - 1
COMMIT_META = b"commit"
#: the layout settings the store was written with (local: not in a commit, kept by ``clear``)
LAYOUT_META = b"layout"
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U64_U8 = struct.Struct(">QB")
_FAMILY_U64_U8 = struct.Struct(">BQB")
_FAMILY_U64 = struct.Struct(">BQ")
_FAMILY_U8_U64 = struct.Struct(">BBQ")
_USER_ROWS = (*((Family.USER_SEQUENCE, int(k)) for k in SequenceKind),
              *((Family.USER_COUNTER, int(c)) for c in CounterKind))


def _check(name: str, value: int, hi: int) -> int:
    """``value`` as a plain int (numpy integers welcome) if it lies in ``[0, hi]``."""
    if type(value) is int and 0 <= value <= hi:  # the common case, without the checks below
        return value
    try:
        if isinstance(value, bool):
            raise TypeError
        as_int = operator.index(value)
    except TypeError:
        raise KeyEncodingError(f"{name}={value!r} is not an integer") from None
    if not 0 <= as_int <= hi:
        raise KeyEncodingError(f"{name}={value!r} out of range [0, {hi}]")
    return as_int


def meta_key(name: bytes) -> bytes:
    if not name or not name.isascii():
        raise KeyEncodingError(f"meta name={name!r} must be non-empty ascii")
    return bytes([Family.META]) + name


def offset_key(topic: str, partition: int) -> bytes:
    return topic_prefix(topic) + _U32.pack(_check("partition", partition, U32_MAX))


def topic_prefix(topic: str) -> bytes:
    """Prefix of every partition offset of ``topic``."""
    if not isinstance(topic, str) or not _TOPIC_RE.match(topic):
        raise KeyEncodingError(f"topic={topic!r} is not a legal Kafka topic name")
    return bytes([Family.OFFSET]) + topic.encode("ascii") + b"\x00"


def user_prefix(user_id: int) -> bytes:
    """Prefix of the user's sequences; the user's counters live under USER_COUNTER + user_id."""
    return bytes([Family.USER_SEQUENCE]) + _U64.pack(_check("user_id", user_id, U64_MAX))


def user_sequence_key(user_id: int, kind: SequenceKind) -> bytes:
    return _FAMILY_U64_U8.pack(Family.USER_SEQUENCE, _check("user_id", user_id, U64_MAX),
                               kind if type(kind) is SequenceKind else SequenceKind(kind))


def user_counter_key(user_id: int, counter: CounterKind) -> bytes:
    return _FAMILY_U64_U8.pack(Family.USER_COUNTER, _check("user_id", user_id, U64_MAX),
                               counter if type(counter) is CounterKind else CounterKind(counter))


def user_row_keys(user_id: int) -> list[bytes]:
    """Every key of one user: the four sequence keys (:class:`SequenceKind` order), then the two
    counter keys (:class:`CounterKind` order).

    >>> user_row_keys(42) == [*(user_sequence_key(42, k) for k in SequenceKind),
    ...                       *(user_counter_key(42, c) for c in CounterKind)]
    True
    """
    uid = _check("user_id", user_id, U64_MAX)
    return [_FAMILY_U64_U8.pack(family, uid, kind) for family, kind in _USER_ROWS]


def item_sketch_key(item_id: int) -> bytes:
    return _FAMILY_U64.pack(Family.ITEM_SKETCH, _check("item_id", item_id, U64_MAX))


def item_counts_key(item_id: int) -> bytes:
    return _FAMILY_U64.pack(Family.ITEM_COUNTS, _check("item_id", item_id, U64_MAX))


def global_dwell_key(shard: int) -> bytes:
    return bytes([Family.GLOBAL_DWELL]) + _U32.pack(_check("shard", shard, U32_MAX))


def join_state_key(kind: JoinStateKind, impression_id: int = 0) -> bytes:
    return _FAMILY_U8_U64.pack(Family.JOIN_STATE, kind, _check("impression_id", impression_id, U64_MAX))


def family_prefix(family: Family) -> bytes:
    return bytes([Family(family)])


def prefix_range(prefix: bytes) -> tuple[bytes, bytes | None]:
    """``[lo, hi)`` covering every key that starts with ``prefix`` (``hi=None``: to the end).

    >>> prefix_range(b"\\x10\\xff")
    (b'\\x10\\xff', b'\\x11')
    """
    stripped = prefix.rstrip(b"\xff")
    if not stripped:
        return prefix, None
    return prefix, stripped[:-1] + bytes([stripped[-1] + 1])


def decode_key(key: bytes) -> tuple[Family, tuple]:
    """The family and the fields a key was built from (the inverse of the builders above)."""
    if not key:
        raise KeyEncodingError("empty key")
    try:
        family = Family(key[0])
    except ValueError:
        raise KeyEncodingError(f"unknown family prefix 0x{key[0]:02x}") from None
    body = key[1:]
    try:
        if family is Family.META:
            return family, (body,)
        if family is Family.OFFSET:
            topic, sep, part = body.partition(b"\x00")
            if not sep or len(part) != 4:
                raise KeyEncodingError(f"malformed offset key {key.hex()}")
            return family, (topic.decode("ascii"), _U32.unpack(part)[0])
        if family is Family.USER_SEQUENCE:
            user_id, kind = _U64_U8.unpack(body)
            return family, (user_id, SequenceKind(kind))
        if family is Family.USER_COUNTER:
            user_id, counter = _U64_U8.unpack(body)
            return family, (user_id, CounterKind(counter))
        if family is Family.JOIN_STATE:
            kind, impression_id = _FAMILY_U64.unpack(body)  # kind (u8), impression id (u64)
            return family, (JoinStateKind(kind), impression_id)
        if family in (Family.ITEM_SKETCH, Family.ITEM_COUNTS):
            return family, (_U64.unpack(body)[0],)
        return family, (_U32.unpack(body)[0],)
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise KeyEncodingError(f"malformed {family.name} key {key.hex()}: {exc}") from None
