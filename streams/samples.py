"""The sample contract (topic ``samples``): one labeled impression with a point-in-time snapshot.

Wire layout v1, little-endian, every message a multiple of 8 bytes so a batch joined end to end can
be viewed as 8- and 4-byte words in place::

    0   magic u8 = 0x5A | version u8 = 1 | type u8 = 0x10 (sample) | flags u8
    4   rules u8 | activeness u8 | age_group i8 | reserved u8 = 0
    8   impression_id i64 | ts_ms i64 | label_ts_ms i64 | snapshot_ts_ms i64 (-1: empty)
    40  user_id i64 | item_id i64
    56  item_category i32 | item_duration_ms u32 | dwell_ms i32 (-1: none) | ndt_weight f32
    72  user_group i32 | n_click u16 | n_unclick u16 | n_like u16 | n_dislike u16 | reserved u32 = 0
    88  per sequence, in the order click, unclick, like, dislike:
            items i64[n] | categories i32[n] | i32 0 when n is odd                (oldest first)

``flags``: bit 0 clicked, 1 valid_read, 2 liked, 3 disliked, 4 emitted early. ``rules``: the valid-read
bits of ``streams.joiner.validread`` (``RULE_*``). ``snapshot_ts_ms`` is the newest event time behind
any snapshot entry and must be < ``ts_ms``: a snapshot holds only what happened before the impression.

>>> s = Sample(impression_id=7, ts_ms=1_000, user_id=42, item_id=9, label_ts_ms=2_000, clicked=True,
...            dwell_ms=30_000, valid_read=True, rules=0b1001, ndt_weight=0.5,
...            snapshot=Snapshot(click_items=(3, 5), click_cats=(1, 1), newest_ts_ms=900))
>>> value = encode(s)
>>> len(value), value[:3].hex(), decode(value) == s
(112, '5a0110', True)
>>> cols = decode_batch([value, value[:-8]], seq_len=4)
>>> cols.seq["click"].items.tolist(), cols.seq["click"].lengths.tolist(), cols.errors
([[3, 5, 0, 0]], [2], [(1, 'wrong_length: 104 bytes; the counts need 112')])
"""
from __future__ import annotations

import math
import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from streams.contracts import ACTIVENESS_LEVELS, MAGIC, ContractError, check_envelope

TOPIC_SAMPLES = "samples"
SAMPLE_TYPE = 0x10
SAMPLE_VERSION = 1
SEQUENCE_KINDS = ("click", "unclick", "like", "dislike")
_SEQUENCE_FIELDS = tuple(f"{k}_{part}" for k in SEQUENCE_KINDS for part in ("items", "cats"))
FIXED_BYTES = 88
FLAG_CLICKED, FLAG_VALID_READ, FLAG_LIKED, FLAG_DISLIKED, FLAG_EARLY = 1, 2, 4, 8, 16
_MAX_SEQ = 0xFFFF

_FIXED = struct.Struct("<BBBBBBbBqqqqqqiIifiHHHHI")
FIXED_DTYPE = np.dtype([
    ("magic", "u1"), ("version", "u1"), ("type", "u1"), ("flags", "u1"),
    ("rules", "u1"), ("activeness", "u1"), ("age_group", "i1"), ("reserved0", "u1"),
    ("impression_id", "<i8"), ("ts_ms", "<i8"), ("label_ts_ms", "<i8"), ("snapshot_ts_ms", "<i8"),
    ("user_id", "<i8"), ("item_id", "<i8"),
    ("item_category", "<i4"), ("item_duration_ms", "<u4"), ("dwell_ms", "<i4"), ("ndt_weight", "<f4"),
    ("user_group", "<i4"), ("n_click", "<u2"), ("n_unclick", "<u2"), ("n_like", "<u2"),
    ("n_dislike", "<u2"), ("reserved1", "<u4"),
])
if _FIXED.size != FIXED_BYTES or FIXED_DTYPE.itemsize != FIXED_BYTES:
    raise RuntimeError(f"sample layout mismatch: {_FIXED.size} / {FIXED_DTYPE.itemsize} != {FIXED_BYTES}")

_I64 = (0, 2**63 - 1)
_BOUNDS = {  # field: (lo, hi) for the integer fields of Sample
    "impression_id": _I64, "ts_ms": _I64, "label_ts_ms": _I64, "user_id": _I64, "item_id": _I64,
    "activeness": (0, len(ACTIVENESS_LEVELS) - 1), "age_group": (-1, 127),
    "item_duration_ms": (0, 2**32 - 1), "item_category": (-1, 2**31 - 1),
    "user_group": (0, 2**31 - 1), "dwell_ms": (-1, 2**31 - 1), "rules": (0, 255),
}


def _check_int(name: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} is not an integer")
    value = int(value)
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value!r} outside [{lo}, {hi}]")
    return value


def _checked_ids(name: str, values, lo: int, hi: int) -> tuple[int, ...]:
    """``values`` as a tuple of ints in [lo, hi]; checked with C-level passes, not one call per entry."""
    try:
        out = tuple(map(operator.index, values))
    except TypeError:
        bad = next(v for v in values if not isinstance(v, (int, np.integer)))
        raise ValueError(f"{name}: {bad!r} is not an integer") from None
    if out and (min(out) < lo or max(out) > hi):
        bad = next(v for v in out if not lo <= v <= hi)
        raise ValueError(f"{name}: {bad!r} outside [{lo}, {hi}]")
    return out


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The user's last behaviours strictly before the impression, oldest first, with item categories.

    ``newest_ts_ms`` is the event time of the newest entry of any sequence (-1 when all are empty);
    the feature store that builds the snapshot sets it.
    """

    click_items: tuple[int, ...] = ()
    click_cats: tuple[int, ...] = ()
    unclick_items: tuple[int, ...] = ()
    unclick_cats: tuple[int, ...] = ()
    like_items: tuple[int, ...] = ()
    like_cats: tuple[int, ...] = ()
    dislike_items: tuple[int, ...] = ()
    dislike_cats: tuple[int, ...] = ()
    newest_ts_ms: int = -1

    @classmethod
    def prechecked(cls, sequences: list[tuple[int, ...]], newest_ts_ms: int) -> "Snapshot":
        """A snapshot of already-checked values without the constructor's checks (the joiner's hot
        path). ``sequences``: (items, cats) tuples of ints in field order (click, unclick, like,
        dislike), each at most ``seq_len`` long, as read back from the feature store, which
        checked every entry when it was staged; ``encode_batch`` checks every row again
        (``snapshot_ts_ms < ts_ms`` included), so nothing unchecked reaches the wire."""
        snap = object.__new__(cls)
        for name, value in zip(_SEQUENCE_FIELDS, sequences):
            object.__setattr__(snap, name, value)
        object.__setattr__(snap, "newest_ts_ms", newest_ts_ms)
        return snap

    def __post_init__(self) -> None:
        empty = True
        for kind in SEQUENCE_KINDS:
            items = _checked_ids(f"{kind}_items", getattr(self, f"{kind}_items"), *_I64)
            cats = _checked_ids(f"{kind}_cats", getattr(self, f"{kind}_cats"), -1, 2**31 - 1)
            if len(items) != len(cats):
                raise ValueError(f"{kind}: {len(items)} items but {len(cats)} categories")
            if len(items) > _MAX_SEQ:
                raise ValueError(f"{kind}: {len(items)} entries > {_MAX_SEQ}")
            object.__setattr__(self, f"{kind}_items", items)
            object.__setattr__(self, f"{kind}_cats", cats)
            empty = empty and not items
        ts = _check_int("newest_ts_ms", self.newest_ts_ms, -1, 2**63 - 1)
        if not empty and ts < 0:
            raise ValueError("newest_ts_ms=-1 but the snapshot has entries")

    def sequence(self, kind: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return getattr(self, f"{kind}_items"), getattr(self, f"{kind}_cats")


#: the snapshot of a user with no history before the impression (a Snapshot is immutable: shared)
EMPTY_SNAPSHOT = Snapshot()


@dataclass(frozen=True, slots=True)
class Sample:
    """One labeled impression. ``ndt_weight`` is stored as float32 (rounded on construction)."""

    impression_id: int
    ts_ms: int
    user_id: int
    item_id: int
    label_ts_ms: int
    activeness: int = 0
    age_group: int = -1
    item_duration_ms: int = 0
    item_category: int = -1
    user_group: int = 0
    clicked: bool = False
    dwell_ms: int = -1
    valid_read: bool = False
    rules: int = 0
    ndt_weight: float = 0.0
    liked: bool = False
    disliked: bool = False
    early: bool = False
    snapshot: Snapshot = field(default_factory=Snapshot)

    def __post_init__(self) -> None:
        for name, (lo, hi) in _BOUNDS.items():
            object.__setattr__(self, name, _check_int(name, getattr(self, name), lo, hi))
        for name in ("clicked", "valid_read", "liked", "disliked", "early"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name}={getattr(self, name)!r} is not a bool")
            object.__setattr__(self, name, bool(getattr(self, name)))
        w = self.ndt_weight
        if isinstance(w, bool) or not isinstance(w, (int, float, np.floating)) or not math.isfinite(w):
            raise ValueError(f"ndt_weight={w!r} is not a finite number")
        object.__setattr__(self, "ndt_weight", float(np.float32(w)))
        if not isinstance(self.snapshot, Snapshot):
            raise ValueError(f"snapshot={self.snapshot!r} is not a Snapshot")
        if self.label_ts_ms <= self.ts_ms:
            raise ValueError(f"label_ts_ms={self.label_ts_ms} <= ts_ms={self.ts_ms}")
        if self.valid_read and not self.clicked:
            raise ValueError("valid_read=True but clicked=False")
        if self.snapshot.newest_ts_ms >= self.ts_ms:
            raise ValueError(f"leakage: snapshot newest_ts_ms={self.snapshot.newest_ts_ms} >= ts_ms={self.ts_ms}")

    @property
    def flags(self) -> int:
        return (self.clicked * FLAG_CLICKED | self.valid_read * FLAG_VALID_READ | self.liked * FLAG_LIKED
                | self.disliked * FLAG_DISLIKED | self.early * FLAG_EARLY)


def snapshot_is_point_in_time(sample: Sample, entry_ts_ms: Sequence[int] | None = None,
                              own_outcome_ts_ms: Sequence[int] = ()) -> bool:
    """True when nothing in the sample's snapshot happened at or after its impression.

    ``entry_ts_ms``: the event times of the snapshot entries as the feature store knows them
    (checked one by one); ``own_outcome_ts_ms``: times of the sample's own click/dwell/feedback,
    none of which may be behind any entry. Integration tests call this on every sample.

    >>> snap = Snapshot(click_items=(3,), click_cats=(1,), newest_ts_ms=900)
    >>> s = Sample(impression_id=7, ts_ms=1_000, user_id=1, item_id=3, label_ts_ms=2_000, snapshot=snap)
    >>> snapshot_is_point_in_time(s, entry_ts_ms=[900]), snapshot_is_point_in_time(s, entry_ts_ms=[1_000])
    (True, False)
    """
    ts = sample.ts_ms
    if sample.snapshot.newest_ts_ms >= ts:
        return False
    times = list(entry_ts_ms or ())
    if any(t >= ts or t > sample.snapshot.newest_ts_ms for t in times):
        return False
    own = set(own_outcome_ts_ms)
    return not any(t in own for t in times)


_EMPTY_SEQUENCES = b""


_sequences = operator.attrgetter(*_SEQUENCE_FIELDS)  # (click_items, click_cats, unclick_items, ...)
_counted = operator.attrgetter(*(f"{k}_items" for k in SEQUENCE_KINDS), "newest_ts_ms")


def _sequence_bytes(snap: Snapshot) -> bytes:
    fields = _sequences(snap)
    parts = []
    for j in range(0, len(fields), 2):
        items = fields[j]
        n = len(items)
        if n:
            parts.append(struct.pack(f"<{n}q{n}i{4 * (n & 1)}x", *items, *fields[j + 1]))
    return b"".join(parts)


def encode(sample: Sample) -> bytes:
    """Encode one sample (current version)."""
    snap = sample.snapshot
    counts = [len(getattr(snap, f"{k}_items")) for k in SEQUENCE_KINDS]
    return _FIXED.pack(
        MAGIC, SAMPLE_VERSION, SAMPLE_TYPE, sample.flags, sample.rules, sample.activeness,
        sample.age_group, 0, sample.impression_id, sample.ts_ms, sample.label_ts_ms, snap.newest_ts_ms,
        sample.user_id, sample.item_id, sample.item_category, sample.item_duration_ms, sample.dwell_ms,
        sample.ndt_weight, sample.user_group, *counts, 0) + _sequence_bytes(snap)


def encode_batch(fixed: np.ndarray, snapshots: Sequence[Snapshot]) -> list[bytes]:
    """Encode many samples from columns: ``fixed`` (B,) FIXED_DTYPE rows and one Snapshot per row.

    The header, counts, ``snapshot_ts_ms`` and reserved fields are filled here (``fixed`` is
    updated in place); every other column is the caller's. Rows are checked with the same
    vectorised rules as :func:`decode_batch`; a bad row raises ValueError with decode's reason.
    """
    if fixed.dtype != FIXED_DTYPE:
        raise ValueError(f"fixed has dtype {fixed.dtype}, expected FIXED_DTYPE")
    if len(fixed) != len(snapshots):
        raise ValueError(f"{len(fixed)} rows but {len(snapshots)} snapshots")
    fixed["magic"], fixed["version"], fixed["type"] = MAGIC, SAMPLE_VERSION, SAMPLE_TYPE
    fixed["reserved0"], fixed["reserved1"] = 0, 0
    seq_bytes = []
    heads = []  # (n_click, n_unclick, n_like, n_dislike, snapshot_ts_ms, sequence bytes) per row
    for j, snap in enumerate(snapshots):
        if not isinstance(snap, Snapshot):
            raise ValueError(f"row {j}: snapshot={snap!r} is not a Snapshot")
        a, b, c, d, newest = _counted(snap)
        seq = _sequence_bytes(snap) if newest >= 0 else _EMPTY_SEQUENCES
        seq_bytes.append(seq)
        heads.append((len(a), len(b), len(c), len(d), newest, len(seq)))
    cols = np.array(heads, dtype=np.int64).reshape(len(heads), 6)  # (B, 6)
    for k, kind in enumerate(SEQUENCE_KINDS):
        fixed[f"n_{kind}"] = cols[:, k]
    fixed["snapshot_ts_ms"] = cols[:, 4]
    lens = FIXED_BYTES + cols[:, 5]
    buf = fixed.tobytes()
    values = [buf[i:i + FIXED_BYTES] + seq for i, seq in zip(range(0, len(buf), FIXED_BYTES), seq_bytes)]
    bad = _bad_rows(fixed, lens)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        try:
            decode(values[i])
        except ContractError as exc:
            raise ValueError(f"row {i}: {exc.reason}") from None
        raise RuntimeError(f"row {i} rejected in batch but decodes alone")
    return values


def _expected_length(counts) -> int:
    return FIXED_BYTES + sum(12 * n + 4 * (n & 1) for n in counts)


def decode(value: bytes) -> Sample:
    """Decode one sample; :class:`~streams.contracts.ContractError` with a reason when malformed."""
    n = check_envelope(value)
    if value[1] != SAMPLE_VERSION:
        raise ContractError(f"unknown_version: {value[1]} (known: [{SAMPLE_VERSION}])")
    if value[2] != SAMPLE_TYPE:
        raise ContractError(f"wrong_type: {value[2]} where sample ({SAMPLE_TYPE}) expected")
    if n < FIXED_BYTES:
        raise ContractError(f"truncated: {n} bytes < {FIXED_BYTES}-byte fixed part")
    (_m, _v, _t, flags, rules, activeness, age_group, res0, impression_id, ts_ms, label_ts_ms, newest,
     user_id, item_id, item_category, duration, dwell_ms, ndt, user_group, *rest) = _FIXED.unpack_from(value)
    counts, res1 = rest[:4], rest[4]
    expected = _expected_length(counts)
    if n != expected:
        raise ContractError(f"wrong_length: {n} bytes; the counts need {expected}")
    if res0 or res1 or flags >> 5:
        raise ContractError(f"invalid_field: reserved bits set (flags=0x{flags:02x})")
    seqs, pos = {}, FIXED_BYTES
    for kind, k in zip(SEQUENCE_KINDS, counts):
        vals = struct.unpack_from(f"<{k}q{k}i", value, pos)
        seqs[f"{kind}_items"], seqs[f"{kind}_cats"] = vals[:k], vals[k:]
        pos += 12 * k + 4 * (k & 1)
    try:
        snapshot = Snapshot(**seqs, newest_ts_ms=newest)
        return Sample(
            impression_id, ts_ms, user_id, item_id, label_ts_ms, activeness, age_group, duration,
            item_category, user_group, bool(flags & FLAG_CLICKED), dwell_ms, bool(flags & FLAG_VALID_READ),
            rules, ndt, bool(flags & FLAG_LIKED), bool(flags & FLAG_DISLIKED), bool(flags & FLAG_EARLY), snapshot)
    except ValueError as exc:
        text = str(exc)
        raise ContractError(text if text.startswith("leakage: ") else f"invalid_field: {text}") from None


@dataclass(frozen=True)
class SequenceColumns:
    """One behaviour sequence of a batch: left-aligned, zero-padded, newest entries kept."""

    items: np.ndarray  # (B, T) int64
    cats: np.ndarray  # (B, T) int32
    lengths: np.ndarray  # (B,) int32, <= T

    @property
    def mask(self) -> np.ndarray:
        """(B, T) bool, True at real entries."""
        return np.arange(self.items.shape[1]) < self.lengths[:, None]


@dataclass(frozen=True)
class SampleColumns:
    """Good rows of a batch: ``fixed`` (B,) structured FIXED_DTYPE, sequences, rejects, positions."""

    fixed: np.ndarray
    seq: dict[str, SequenceColumns]
    errors: list[tuple[int, str]]
    index: np.ndarray  # (B,) int64 position of each good row in the input

    def __len__(self) -> int:
        return len(self.fixed)

    def column(self, name: str) -> np.ndarray:
        """A fixed column, or one of the flags ``clicked``, ``valid_read``, ``liked``, ``disliked``, ``early``."""
        bit = {"clicked": FLAG_CLICKED, "valid_read": FLAG_VALID_READ, "liked": FLAG_LIKED,
               "disliked": FLAG_DISLIKED, "early": FLAG_EARLY}.get(name)
        if bit is not None:
            return (self.fixed["flags"] & bit) != 0
        return self.fixed[name]


_WORDS = FIXED_BYTES // 8


def _bad_rows(fx: np.ndarray, lens: np.ndarray) -> np.ndarray:
    bad = (fx["magic"] != MAGIC) | (fx["version"] != SAMPLE_VERSION) | (fx["type"] != SAMPLE_TYPE)
    bad |= (fx["flags"] >> 5) != 0
    bad |= (fx["reserved0"] != 0) | (fx["reserved1"] != 0)
    bad |= fx["activeness"] >= len(ACTIVENESS_LEVELS)
    bad |= fx["age_group"] < -1
    for name in ("impression_id", "ts_ms", "label_ts_ms", "user_id", "item_id", "item_category", "user_group"):
        bad |= fx[name] < (-1 if name == "item_category" else 0)
    bad |= fx["dwell_ms"] < -1
    bad |= ~np.isfinite(fx["ndt_weight"])
    bad |= fx["label_ts_ms"] <= fx["ts_ms"]
    bad |= fx["snapshot_ts_ms"] >= fx["ts_ms"]
    bad |= ((fx["flags"] & FLAG_VALID_READ) != 0) & ((fx["flags"] & FLAG_CLICKED) == 0)
    expected = np.full(len(fx), FIXED_BYTES, dtype=np.int64)
    empty = np.ones(len(fx), dtype=bool)
    for kind in SEQUENCE_KINDS:
        n = fx[f"n_{kind}"].astype(np.int64)
        expected += 12 * n + 4 * (n & 1)
        empty &= n == 0
    bad |= expected != lens
    bad |= ~empty & (fx["snapshot_ts_ms"] < 0)
    bad |= fx["snapshot_ts_ms"] < -1
    return bad


def _gather(sources: tuple[tuple[np.ndarray, np.ndarray], ...], keep: np.ndarray, t: int,
            zero_padding: bool) -> list[np.ndarray]:
    """Per ``(words, first)`` source, a (B, T) matrix of ``keep[b]`` words from ``first[b]`` on.

    Dense sequences: one row gather from a sliding-window view (B copies of T words), then the
    padding is cleared. Sparse ones (under a quarter full): scatter only the real entries into
    zeros through flat indices shared by the sources.
    """
    b = len(keep)
    total = int(keep.sum())
    if total * 4 < b * t:
        outs = [np.zeros(b * t, dtype=words.dtype) for words, _ in sources]
        if total:
            offs = np.cumsum(keep) - keep  # (B,) where each row starts among the entries
            step = np.arange(total)
            dst = np.repeat(np.arange(b) * t - offs, keep) + step
            for out, (words, first) in zip(outs, sources):
                out[dst] = words[np.repeat(first - offs, keep) + step]
        return [out.reshape(b, t) for out in outs]
    mask = np.arange(t) < keep[:, None] if zero_padding and b and (keep < t).any() else None  # (B, T)
    outs = []
    for words, first in sources:
        out = sliding_window_view(words, t)[first]
        if mask is not None:
            out *= mask  # a multiply beats a masked store
        outs.append(out)
    return outs


def decode_batch(values: Sequence[bytes], seq_len: int | None = 100, zero_padding: bool = True) -> SampleColumns:
    """Decode many samples into columns; sequences become (B, ``seq_len``) matrices.

    A sequence longer than ``seq_len`` keeps its newest ``seq_len`` entries; ``seq_len=None`` pads
    to the longest sequence in the batch. ``zero_padding=False`` leaves arbitrary values at the
    padding positions (the lengths / mask are authoritative) and saves a pass over the matrices.
    Rows that fail the vectorised checks are decoded alone to report exactly the reason
    :func:`decode` gives.

    Each row's sequence is contiguous on the wire, so a (B, T) matrix is one row gather from a
    sliding-window view of the batch buffer (B copies of T words), not B * T element gathers.
    """
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len={seq_len!r} must be an integer >= 1 or None")
    n = len(values)
    try:
        lens = np.fromiter(map(len, values), dtype=np.int64, count=n)
    except TypeError:
        lens = np.fromiter((len(v) if isinstance(v, (bytes, bytearray, memoryview)) else -1 for v in values),
                           dtype=np.int64, count=n)
    sized = (lens >= FIXED_BYTES) & (lens % 8 == 0)
    chosen = values if sized.all() else [values[i] for i in np.flatnonzero(sized).tolist()]
    candidates = np.arange(n) if chosen is values else np.flatnonzero(sized)
    clens = lens[candidates]
    starts = np.zeros(len(candidates), dtype=np.int64)
    np.cumsum(clens[:-1] // 8, out=starts[1:])
    counts_max = 0
    if seq_len is None:  # peek at the counts to size T before the tail padding is chosen
        head = np.frombuffer(b"".join(chosen), dtype="<i8") if chosen else np.zeros(0, "<i8")
        if len(head):
            fx0 = sliding_window_view(head, _WORDS)[starts].view(FIXED_DTYPE).reshape(-1)
            counts_max = max(int(fx0[f"n_{k}"].max()) for k in SEQUENCE_KINDS)
    t = seq_len if seq_len is not None else max(1, counts_max)
    tail = bytes(8 * max(t, _WORDS))  # so that every window of T words starting in the data exists
    buf = b"".join([*chosen, tail])
    w8, w4 = np.frombuffer(buf, dtype="<i8"), np.frombuffer(buf, dtype="<i4")
    fixed = sliding_window_view(w8, _WORDS)[starts].view(FIXED_DTYPE).reshape(-1)  # (C,) from (C, 11) words
    bad = _bad_rows(fixed, clens)
    errors: list[tuple[int, str]] = []
    if bad.any() or len(candidates) < n:
        rejected = np.ones(n, dtype=bool)
        rejected[candidates[~bad]] = False
        for i in np.flatnonzero(rejected).tolist():
            try:
                decode(values[i])
            except ContractError as exc:
                errors.append((i, exc.reason))
            else:
                raise RuntimeError(f"row {i} rejected in batch but decodes alone")
        good = ~bad
        fixed, starts, candidates = fixed[good], starts[good], candidates[good]
    b = len(fixed)
    counts = np.empty((4, b), dtype=np.int64)  # (4, B)
    for j, kind in enumerate(SEQUENCE_KINDS):
        counts[j] = fixed[f"n_{kind}"]
    keep = np.minimum(counts, t)  # (4, B)
    words = (3 * counts + (counts & 1)) // 2  # 8-byte words each sequence takes
    base = starts + _WORDS + np.concatenate([np.zeros((1, b), np.int64), np.cumsum(words[:-1], axis=0)])
    seq = {}
    for j, kind in enumerate(SEQUENCE_KINDS):
        first8 = base[j] + counts[j] - keep[j]  # word of the oldest kept item
        first4 = 2 * (base[j] + counts[j]) + counts[j] - keep[j]  # its category, in 4-byte words
        items, cats = _gather(((w8, first8), (w4, first4)), keep[j], t, zero_padding)  # (B, T) each
        seq[kind] = SequenceColumns(items, cats, keep[j].astype(np.int32))
    return SampleColumns(fixed, seq, errors, candidates.astype(np.int64))
