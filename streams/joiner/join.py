"""The per-partition join state machine: impressions + clicks, dwell and feedback -> one record each.

Pure and faust-free: :meth:`JoinCore.process` takes events (decoded contracts) in arrival order and
returns what became final (the records of :mod:`streams.joiner.records`). Every rule is stated in
event time, so the output depends only on the set of events as long as each arrives no later than
the allowed lateness (see docs/joiner.md).

* watermark ``W`` = max event time seen - ``allowed_lateness_ms`` (an event with ``ts < W`` when it
  arrives violates the bound);
* impression ``i`` opens a pending record; an outcome (click, dwell, feedback) attaches by
  ``impression_id`` when ``ts_i - grace_ms <= ts < ts_i + label_window_ms``; outcomes that arrive
  before their impression wait in a buffer;
* close ``c_i`` = ``ts_i + label_window_ms``, or with early emission ``max(first click ts, first
  dwell ts, ts_i) + final_dwell_settle_ms`` when smaller; the record is emitted once, when ``W >= c_i``,
  with the attached outcomes of ``ts < c_i``;
* an outcome for an emitted impression is ``late`` (or ``duplicate``); an outcome still waiting when
  ``W > ts + orphan_grace_ms``, or naming another user or item than its impression, is an
  ``orphan``; a repeated ``event_id`` is a ``duplicate``.

>>> from streams.contracts import Click, ContractError, Dwell, Impression
>>> core = JoinCore(JoinerConfig(allowed_lateness_ms=0, label_window_ms=1_000))
>>> out = core.process([Click(2, 105, 7, 1, 9), Impression(1, 100, 1, 9, 7), Dwell(3, 300, 7, 1, 9, 200)])
>>> out.samples, core.counters()["pending"]
([], 1)
>>> [(s.impression.impression_id, s.clicked, s.dwell_ms, s.label_ts_ms) for s in core.advance(1_100).samples]
[(7, True, 200, 1100)]
"""
from __future__ import annotations

import logging
import struct
from collections.abc import Collection, Iterable
from heapq import heappop, heappush

from featurestore.keys import Family, JoinStateKind, decode_key, join_state_key
from streams.contracts import Click, ContractError, Dwell, Event, FeedbackKind, Impression, decode, encode
from streams.joiner.config import JoinerConfig
from streams.joiner.records import JoinedImpression, JoinOutput, LateEvent, OrphanEvent, joined_impression

# the records are defined in streams.joiner.records and still importable from here
__all__ = ["JoinCore", "JoinOutput", "JoinedImpression", "LateEvent", "OrphanEvent"]

logger = logging.getLogger(__name__)

_INF = 2**63  # a watermark past every event time (flush)
_NEG_INF = -(2**63)
_U64, _I64_MAX = 2**64 - 1, 2**63 - 1
# the three per-id parts of the state (indexes of JoinCore._touched / _born) and their store kinds
_PENDING, _WAITING, _EMITTED = 0, 1, 2
_STORE_KINDS = (JoinStateKind.PENDING, JoinStateKind.WAITING, JoinStateKind.EMITTED)


class _Pending:
    __slots__ = ("impression", "events", "ids", "close", "first_click", "first_dwell")

    def __init__(self, impression: Impression, close: int) -> None:
        self.impression = impression
        self.events: list[Event] = []
        self.ids = {impression.event_id}
        self.close = close
        self.first_click = _INF
        self.first_dwell = _INF


_COUNTERS = ("events", "impressions", "emitted", "emitted_early", "late", "orphan", "duplicate")


class JoinCore:
    """Join state of one partition; state changes only through :meth:`process` / :meth:`advance`."""

    def __init__(self, config: JoinerConfig) -> None:
        self.config = config
        # the config fields the event paths read, as plain attributes (the config is frozen)
        self._lateness = config.allowed_lateness_ms
        self._window = config.label_window_ms
        self._grace = config.grace_ms
        self._orphan_grace = config.orphan_grace_ms
        self._retention = config.emitted_retention_ms
        self._emit_early = config.emit_early_on_final_dwell
        self._settle = config.final_dwell_settle_ms
        self._max_ts = _NEG_INF
        self._pending: dict[int, _Pending] = {}
        self._buffer: dict[int, list[Event]] = {}  # impression_id -> outcomes waiting for it
        self._emitted: dict[int, tuple[int, set[int]]] = {}  # impression_id -> (close, event ids)
        self._due: list[tuple[int, int]] = []  # (close, impression_id), lazily invalidated
        self._orphan_due: list[tuple[int, int, int]] = []  # (ts + orphan grace, impression_id, event_id)
        self._forget_due: list[tuple[int, int]] = []  # (close + retention, impression_id)
        self._n = dict.fromkeys(_COUNTERS, 0)
        # ids whose pending record / waiting outcomes / emitted entry changed since the last
        # state_changes(), and those of them that did not exist then (nothing to delete)
        self._touched: tuple[set[int], set[int], set[int]] = (set(), set(), set())
        self._born: tuple[set[int], set[int], set[int]] = (set(), set(), set())

    # -- public API -------------------------------------------------------------------------
    @property
    def watermark_ms(self) -> int | None:
        """Max event time seen minus the allowed lateness; None before the first event."""
        return None if self._max_ts == _NEG_INF else self._max_ts - self._lateness

    def process(self, events: list[Event]) -> JoinOutput:
        """Apply events in arrival order; return the samples, late events and orphans they finalise."""
        out = JoinOutput()
        lateness = self._lateness
        self._n["events"] += len(events)
        due, orphan_due, forget = self._due, self._orphan_due, self._forget_due
        on_impression, on_outcome, advance = self._on_impression, self._on_outcome, self._advance
        max_ts = self._max_ts
        for e in events:
            if type(e) is Impression:
                on_impression(e, out)
            else:
                on_outcome(e, out)
            if e.ts_ms > max_ts:
                max_ts = self._max_ts = e.ts_ms
            w = max_ts - lateness
            # due records: the watermark moved, or an early close fell behind it (late input)
            if (due and due[0][0] <= w) or (orphan_due and orphan_due[0][0] < w) or (forget and forget[0][0] <= w):
                advance(w, out)
        return out

    def advance(self, event_time_ms: int) -> JoinOutput:
        """Move event time forward as if an event at ``event_time_ms`` was seen (idle partitions)."""
        out = JoinOutput()
        if event_time_ms > self._max_ts:
            self._max_ts = event_time_ms
            self._advance(event_time_ms - self._lateness, out)
        return out

    def flush(self) -> JoinOutput:
        """End of input: emit every pending record and orphan every waiting outcome.

        Emitted ids are kept (until the watermark passes their retention), so an impression
        redelivered after a flush is still recognised as a duplicate.
        """
        out = JoinOutput()
        self._advance(_INF, out, forget=False)
        return out

    def counters(self) -> dict[str, int]:
        """Monotonic path counters plus the sizes of the state (``pending``, ``buffered``, ``retained``)."""
        return {**self._n, "pending": len(self._pending),
                "buffered": sum(map(len, self._buffer.values())), "retained": len(self._emitted)}

    def pending_records(self, user_ids: Collection[int]) -> dict[int, list[tuple[Impression, int, tuple[Event, ...]]]]:
        """Read-only view of the impressions of ``user_ids`` not emitted yet: user_id -> [(impression,
        current close, attached outcomes)], in no particular order.

        The attached outcomes are those that passed the attach checks so far (some may still fall
        at or after the close and be dropped at emission). One pass over the pending records.
        """
        wanted = user_ids if isinstance(user_ids, (set, frozenset, dict)) else set(user_ids)
        out: dict[int, list[tuple[Impression, int, tuple[Event, ...]]]] = {}
        for p in self._pending.values():
            u = p.impression.user_id
            if u in wanted:
                out.setdefault(u, []).append((p.impression, p.close, tuple(p.events)))
        return out

    # -- event paths -----------------------------------------------------------------------
    def _on_impression(self, imp: Impression, out: JoinOutput) -> None:
        k = imp.impression_id
        pending = self._pending
        if k in pending or k in self._emitted:
            self._n["duplicate"] += 1  # the same event again, or a reused impression_id: first wins
            return
        close = imp.ts_ms + self._window
        if close <= self._max_ts - self._lateness:
            if k in self._buffer:
                self._touch(_WAITING, k)
            for e in [imp, *self._buffer.pop(k, ())]:  # waiting outcomes share its fate
                self._late(out, e, "window_closed")
            return
        self._n["impressions"] += 1
        p = pending[k] = _Pending(imp, close)
        self._touch(_PENDING, k, created=True)
        heappush(self._due, (close, k))
        if k in self._buffer:
            self._touch(_WAITING, k)
            for e in self._buffer.pop(k):
                self._attach(p, e, out)

    def _on_outcome(self, e: Event, out: JoinOutput) -> None:
        k = e.impression_id
        if k is None:
            # retained like an emitted impression, under a key no impression id takes (ids are >= 0),
            # so a redelivery is a duplicate, not a second orphan
            nk = -1 - e.event_id
            if nk in self._emitted:
                self._n["duplicate"] += 1
                return
            self._emitted[nk] = (e.ts_ms, {e.event_id})
            self._touch(_EMITTED, nk, created=True)
            heappush(self._forget_due, (e.ts_ms + self._retention, nk))
            self._n["orphan"] += 1
            out.orphans.append(OrphanEvent(e, "no_impression_id"))
            return
        p = self._pending.get(k)
        if p is not None:
            if e.event_id in p.ids:
                self._n["duplicate"] += 1
            else:
                self._attach(p, e, out)
                self._touch(_PENDING, k)
            return
        done = self._emitted.get(k)
        if done is not None:
            if e.event_id in done[1]:
                self._n["duplicate"] += 1
            else:
                done[1].add(e.event_id)
                self._touch(_EMITTED, k)
                self._late(out, e, "after_emit")
            return
        waiting = self._buffer.get(k)
        if waiting is None:
            waiting = self._buffer[k] = []
            self._touch(_WAITING, k, created=True)
        elif any(w.event_id == e.event_id for w in waiting):
            self._n["duplicate"] += 1
            return
        else:
            self._touch(_WAITING, k)
        waiting.append(e)
        heappush(self._orphan_due, (e.ts_ms + self._orphan_grace, k, e.event_id))

    def _attach(self, p: _Pending, e: Event, out: JoinOutput) -> None:
        imp = p.impression
        ts, ts_i = e.ts_ms, imp.ts_ms
        p.ids.add(e.event_id)
        if e.user_id != imp.user_id or e.item_id != imp.item_id:
            self._n["orphan"] += 1
            out.orphans.append(OrphanEvent(e, "mismatch"))  # names another user's or item's impression
            return
        if ts < ts_i - self._grace:
            self._n["orphan"] += 1
            out.orphans.append(OrphanEvent(e, "before_impression"))
            return
        if ts >= ts_i + self._window:
            self._late(out, e, "after_window")
            return
        p.events.append(e)
        kind = type(e)
        if kind is Click and ts < p.first_click:
            p.first_click = ts
        elif kind is Dwell and ts < p.first_dwell:
            p.first_dwell = ts
        else:
            return
        if self._emit_early and p.first_click != _INF and p.first_dwell != _INF:
            # the impression's own ts too: a click and dwell up to grace_ms before it (clock skew)
            # must not close it before it was shown (label_ts > ts, docs/joiner.md section 1)
            early = max(p.first_click, p.first_dwell, imp.ts_ms) + self._settle
            if early < p.close:
                p.close = early
                heappush(self._due, (early, imp.impression_id))

    def _touch(self, kind: int, k: int, created: bool = False) -> None:
        touched = self._touched[kind]
        if k not in touched:
            touched.add(k)
            if created:  # absent when it was first touched since the last export: never stored
                self._born[kind].add(k)

    def _late(self, out: JoinOutput, e: Event, reason: str) -> None:
        self._n["late"] += 1
        out.late.append(LateEvent(e, reason))

    # -- watermark ---------------------------------------------------------------------------
    def _advance(self, w: int, out: JoinOutput, forget: bool = True) -> None:
        n = self._n
        due = self._due
        if due and due[0][0] <= w:
            pending, emit, samples = self._pending, self._emit, out.samples
            n_before = len(samples)
            while due and due[0][0] <= w:
                close, k = heappop(due)
                p = pending.get(k)
                if p is not None and p.close == close:
                    del pending[k]
                    self._touch(_PENDING, k)
                    samples.append(emit(p, out))
            n["emitted"] += len(samples) - n_before
        orphan_due, buffer = self._orphan_due, self._buffer
        while orphan_due and orphan_due[0][0] < w:
            _t, k, event_id = heappop(orphan_due)
            waiting = buffer.get(k)
            if waiting:
                for j, e in enumerate(waiting):
                    if e.event_id == event_id:
                        del waiting[j]
                        n["orphan"] += 1
                        out.orphans.append(OrphanEvent(e, "no_impression"))
                        self._touch(_WAITING, k)
                        break
                if not waiting:
                    del buffer[k]
                    self._touch(_WAITING, k)
        if not forget:
            return
        forget_due, emitted, retention = self._forget_due, self._emitted, self._retention
        while forget_due and forget_due[0][0] <= w:
            t, k = heappop(forget_due)
            done = emitted.get(k)
            if done is not None and done[0] + retention == t:
                del emitted[k]
                self._touch(_EMITTED, k)

    def _emit(self, p: _Pending, out: JoinOutput) -> JoinedImpression:
        """The record of ``p``; files it as emitted (the caller counts it and drops it from pending)."""
        close = p.close
        click_ts, dwell, like_ts, dislike_ts = _INF, None, _INF, _INF
        for e in p.events:
            if e.ts_ms >= close:
                self._late(out, e, "after_close")
                continue
            kind = type(e)
            if kind is Click:
                click_ts = min(click_ts, e.ts_ms)
            elif kind is Dwell:
                if dwell is None or (e.ts_ms, e.event_id) > (dwell.ts_ms, dwell.event_id):
                    dwell = e
            elif e.kind == FeedbackKind.LIKE:
                like_ts = min(like_ts, e.ts_ms)
            else:
                dislike_ts = min(dislike_ts, e.ts_ms)
        imp = p.impression
        k = imp.impression_id
        early = close != imp.ts_ms + self._window
        if early:
            self._n["emitted_early"] += 1
        self._emitted[k] = (close, p.ids)
        self._touch(_EMITTED, k, created=True)
        heappush(self._forget_due, (close + self._retention, k))
        clicked = click_ts != _INF
        liked, disliked = like_ts != _INF, dislike_ts != _INF
        return joined_impression(
            imp, clicked, click_ts if clicked else -1, -1 if dwell is None else dwell.dwell_ms,
            -1 if dwell is None else dwell.ts_ms, liked, disliked, close, early,
            like_ts if liked else -1, dislike_ts if disliked else -1)

    # -- state -------------------------------------------------------------------------------
    def state_changes(self) -> list[tuple[bytes, bytes | None]]:
        """The state's changes since the last call, as store records (``featurestore.keys``,
        family JOIN_STATE): the header (watermark and counters), then per changed id its pending
        record, its waiting outcomes or its emitted entry, or None where a stored one is gone
        (emitted, attached, orphaned, forgotten). A commit writes these instead of the whole
        state, so its size follows what the batch changed, not how much state is held (the whole
        state was 0.6 MB per commit at slice x8 and grows with the event rate). Clears the change
        sets: the caller commits the records with the rest of the batch's state."""
        out = [(join_state_key(JoinStateKind.HEADER), self._header())]
        live = (self._pending, self._buffer, self._emitted)
        packers = (_pack_pending, _pack_events, _pack_emitted)
        for part in (_PENDING, _WAITING, _EMITTED):
            touched, born, have, pack, kind = (self._touched[part], self._born[part], live[part], packers[part],
                                               _STORE_KINDS[part])
            for k in sorted(touched):
                v = have.get(k)
                if v is not None:
                    out.append((join_state_key(kind, k & _U64), pack(v)))
                elif k not in born:
                    out.append((join_state_key(kind, k & _U64), None))
            touched.clear()
            born.clear()
        return out

    def touch_all(self) -> None:
        """Mark every held record changed (the next :meth:`state_changes` writes all of them)."""
        for part, have in ((_PENDING, self._pending), (_WAITING, self._buffer), (_EMITTED, self._emitted)):
            self._touched[part].update(have)

    @classmethod
    def from_state(cls, rows: Iterable[tuple[bytes, bytes]], config: JoinerConfig) -> JoinCore | None:
        """Rebuild a core from its stored records (:meth:`state_changes` applied to a store, read
        back in key order: the header first); None when there are none."""
        core: JoinCore | None = None
        n_waiting = 0
        for key, value in rows:
            family, (kind, k) = decode_key(key)
            if family is not Family.JOIN_STATE:
                raise ValueError(f"joiner state: key {key.hex()} is not a join state key")
            if k > _I64_MAX:  # a retained outcome without an impression (a negative key in the core)
                k -= 1 << 64
            view = memoryview(value)
            try:
                if kind is JoinStateKind.HEADER:
                    core = cls(config)
                    core._restore_header(view)
                    continue
                if core is None:
                    raise ValueError("joiner state: records without a header")
                if kind is JoinStateKind.PENDING:
                    events, pos = _unpack_events(view, 0)
                    imp = events[0]
                    if type(imp) is not Impression or imp.impression_id != k:
                        raise ValueError(f"joiner state: pending record {k} holds {imp!r}")
                    pos = core._restore_pending(events, view, pos)
                elif kind is JoinStateKind.WAITING:
                    waiting, pos = _unpack_events(view, 0)
                    for e in waiting:
                        core._restore_waiting(k, e)
                    n_waiting += len(waiting)
                else:
                    (close,) = struct.unpack_from("<q", view, 0)
                    ids, pos = _unpack_ids(view, 8)
                    core._restore_emitted(k, close, ids)
            except (struct.error, IndexError, ContractError) as exc:
                raise ValueError(f"joiner state: corrupt {kind.name} record of {k} ({exc})") from None
            if pos != len(view):
                raise ValueError(f"joiner state: {len(view) - pos} trailing bytes in the {kind.name} record of {k}")
        if core is not None:
            logger.info("joiner state restored pending=%d buffered=%d retained=%d watermark_ms=%s",
                        len(core._pending), n_waiting, len(core._emitted), core.watermark_ms)
        return core

    def _header(self) -> bytes:
        return _STATE_HEAD.pack(_STATE_MAGIC, _STATE_VERSION, self._max_ts, *(self._n[c] for c in _COUNTERS))

    def _restore_header(self, view: memoryview) -> None:
        if len(view) != _STATE_HEAD.size or bytes(view[:4]) != _STATE_MAGIC:
            raise ValueError("joiner state: bad magic or truncated header")
        _magic, version, max_ts, *counts = _STATE_HEAD.unpack_from(view, 0)
        if version != _STATE_VERSION:
            raise ValueError(f"joiner state: version={version} (known: {_STATE_VERSION})")
        self._max_ts = max_ts
        self._n = dict(zip(_COUNTERS, counts))

    def to_bytes(self) -> bytes:
        """The whole state as one versioned blob (events in their contract encoding; no pickle).

        Stores written before the per-record layout hold this blob (the pipeline reads it once and
        writes records from then on); a committing pipeline uses :meth:`state_changes`."""
        parts = [self._header()]
        parts.append(struct.pack("<I", len(self._pending)))
        for p in self._pending.values():
            parts.append(_pack_events([p.impression, *p.events]))
            parts.append(_pack_ids(p.ids))
        waiting = [e for es in self._buffer.values() for e in es]
        parts.append(_pack_events(waiting))
        parts.append(struct.pack("<I", len(self._emitted)))
        for k, (close, ids) in self._emitted.items():
            parts.append(struct.pack("<qq", k, close))
            parts.append(_pack_ids(ids))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes, config: JoinerConfig) -> JoinCore:
        """Rebuild a core from :meth:`to_bytes`; it continues exactly as the original would."""
        view = memoryview(data)
        core = cls(config)
        core._restore_header(view[:_STATE_HEAD.size])
        try:
            pos, n_waiting = core._restore_body(view, _STATE_HEAD.size)
        except (struct.error, IndexError, ContractError) as exc:
            raise ValueError(f"joiner state: truncated or corrupt body ({exc})") from None
        if pos != len(view):
            raise ValueError(f"joiner state: {len(view) - pos} trailing bytes")
        logger.info("joiner state restored pending=%d buffered=%d retained=%d watermark_ms=%s",
                    len(core._pending), n_waiting, len(core._emitted), core.watermark_ms)
        return core

    def _restore_body(self, view: memoryview, pos: int) -> tuple[int, int]:
        (n_pending,), pos = struct.unpack_from("<I", view, pos), pos + 4
        for _ in range(n_pending):
            events, pos = _unpack_events(view, pos)
            pos = self._restore_pending(events, view, pos)
        waiting, pos = _unpack_events(view, pos)
        for e in waiting:
            self._restore_waiting(e.impression_id, e)
        (n_emitted,), pos = struct.unpack_from("<I", view, pos), pos + 4
        for _ in range(n_emitted):
            k, close = struct.unpack_from("<qq", view, pos)
            ids, pos = _unpack_ids(view, pos + 16)
            self._restore_emitted(k, close, ids)
        return pos, len(waiting)

    # one held item each, the same for the record layout (from_state) and the blob (from_bytes)
    def _restore_pending(self, events: list[Event], view: memoryview, pos: int) -> int:
        """A pending impression (``events``: it, then its attached outcomes) with its event ids
        read from ``view`` at ``pos``; returns the position after them."""
        imp = events[0]
        p = self._pending[imp.impression_id] = _Pending(imp, imp.ts_ms + self.config.label_window_ms)
        heappush(self._due, (p.close, imp.impression_id))
        self._restore_attached(p, events[1:])
        p.ids, pos = _unpack_ids(view, pos)
        return pos

    def _restore_waiting(self, k: int, e: Event) -> None:
        self._buffer.setdefault(k, []).append(e)
        heappush(self._orphan_due, (e.ts_ms + self.config.orphan_grace_ms, k, e.event_id))

    def _restore_emitted(self, k: int, close: int, ids) -> None:
        self._emitted[k] = (close, ids)
        heappush(self._forget_due, (close + self.config.emitted_retention_ms, k))

    def _restore_attached(self, p: _Pending, events: list[Event]) -> None:
        sink = JoinOutput()
        for e in events:
            self._attach(p, e, sink)
        if sink.late or sink.orphans or len(p.events) != len(events):
            raise ValueError("joiner state: a stored attached event no longer attaches (config changed?)")


_STATE_MAGIC = b"SRJ\x00"
_STATE_VERSION = 1
_STATE_HEAD = struct.Struct(f"<4sBq{len(_COUNTERS)}Q")


def _pack_pending(p: _Pending) -> bytes:
    return _pack_events([p.impression, *p.events]) + _pack_ids(p.ids)


def _pack_emitted(entry: tuple[int, set[int]]) -> bytes:
    return struct.pack("<q", entry[0]) + _pack_ids(entry[1])


def _pack_events(events: list[Event]) -> bytes:
    parts = [struct.pack("<I", len(events))]
    for e in events:
        value = encode(e)
        parts.append(struct.pack("<B", len(value)))
        parts.append(value)
    return b"".join(parts)


def _unpack_events(view: memoryview, pos: int) -> tuple[list[Event], int]:
    (n,) = struct.unpack_from("<I", view, pos)
    pos += 4
    events = []
    for _ in range(n):
        size = view[pos]
        events.append(decode(bytes(view[pos + 1:pos + 1 + size])))
        pos += 1 + size
    return events, pos


def _pack_ids(ids: set[int]) -> bytes:
    return struct.pack(f"<I{len(ids)}q", len(ids), *sorted(ids))


def _unpack_ids(view: memoryview, pos: int) -> tuple[set[int], int]:
    (n,) = struct.unpack_from("<I", view, pos)
    return set(struct.unpack_from(f"<{n}q", view, pos + 4)), pos + 4 + 8 * n
