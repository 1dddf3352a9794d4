"""Per-sample user state of the pipeline: the snapshot and T2 count it reads, the entries it stages.

For each sample, in close order, :class:`UserSnapshots` reads the user's four sequences strictly
before the impression's ts (the snapshot) and the user's clicks in ``[click ts - window, click
ts)`` (T2) from the user's rows in the open store transaction
(:class:`~featurestore.userrows.UserRows`), which already hold every earlier sample's updates,
merged with the outcomes of the user's impressions shown before the sample's close that close
after it (:func:`unsettled_entries`); then :func:`stage_user` stages the sample's own entries,
each at the time it became known (docs/joiner.md, section 4 "snapshot" and section 2 "T2").
"""
from __future__ import annotations

from featurestore import CounterKind, SequenceKind
from featurestore.userrows import UserRows
from streams.contracts import Click, Event, Feedback, FeedbackKind, Impression
from streams.joiner.records import JoinedImpression
from streams.samples import EMPTY_SNAPSHOT, SEQUENCE_KINDS, Snapshot

#: (entry ts, impression_id, item_id, category) of an outcome not yet in the store
Entry = tuple[int, int, int, int]
#: the impressions pending in the core, per user: (impression, close, attached events)
Pending = dict[int, list[tuple[Impression, int, tuple[Event, ...]]]]
# UserRows.sequences() come in SequenceKind order and Snapshot.prechecked takes the sample
# contract's order: the same order, checked once here
if [k.name.lower() for k in SequenceKind] != list(SEQUENCE_KINDS):
    raise RuntimeError(f"SequenceKind order {list(SequenceKind)} differs from the samples' {SEQUENCE_KINDS}")
_CLICK, _UNCLICK, _LIKE, _DISLIKE = SequenceKind.CLICK, SequenceKind.UNCLICK, SequenceKind.LIKE, SequenceKind.DISLIKE
_N_CLICK, _N_IMPRESSION = CounterKind.CLICK, CounterKind.IMPRESSION
_EMPTY_PAIR = ((), ())


def unsettled_entries(joined: list[JoinedImpression], idx: int, by_user: dict[int, list[int]],
                      pending: Pending) -> list[list[Entry]] | None:
    """Click, like and dislike entries of the user's impressions that close after ``joined[idx]``
    but were shown before its close, with entry ts before that close; None when there are none.

    Those impressions are later in ``joined`` (their outcome is final) or pending in the core.
    Under the lateness bound every event with ts < the sample's close has arrived when the
    sample is emitted, and a pending impression's close can only move to a time >= the
    watermark then; so its outcomes before that close are final too, and the result does not
    depend on how the input was cut into batches. Sorted by ``(ts, impression_id)``.
    ``by_user``: the user's positions in ``joined``, ascending.
    """
    s = joined[idx]
    user = s.impression.user_id
    positions = by_user[user]
    waiting = pending.get(user)
    if positions[-1] <= idx and not waiting:  # the user's last sample of the call, nothing pending
        return None
    cut = s.label_ts_ms
    out: list[list[Entry]] = [[], [], []]  # click, like, dislike
    for k in positions:
        if k <= idx:
            continue
        o = joined[k]
        imp = o.impression
        if imp.ts_ms >= cut:
            continue
        for lst, t in zip(out, (o.click_ts_ms, o.like_ts_ms, o.dislike_ts_ms)):
            if 0 <= t < cut:
                lst.append((t, imp.impression_id, imp.item_id, imp.item_category))
    for imp, _close, events in waiting or ():
        if imp.ts_ms >= cut:
            continue
        first = [cut, cut, cut]
        for e in events:
            if e.ts_ms >= cut:
                continue
            kind = type(e)
            if kind is Click:
                f = 0
            elif kind is Feedback:
                f = 1 if e.kind == FeedbackKind.LIKE else 2
            else:
                continue
            if e.ts_ms < first[f]:
                first[f] = e.ts_ms
        for lst, t in zip(out, first):
            if t < cut:
                lst.append((t, imp.impression_id, imp.item_id, imp.item_category))
    if not (out[0] or out[1] or out[2]):
        return None
    for lst in out:
        lst.sort()
    return out


class UserSnapshots:
    """Reads a sample's snapshot (``seq_len`` entries per sequence) and T2 count (the clicks in
    ``t2_window_ms`` before its click, from up to ``max_len`` stored clicks)."""

    def __init__(self, seq_len: int, max_len: int, t2_window_ms: int) -> None:
        self.seq_len, self.max_len, self.t2_window_ms = seq_len, max_len, t2_window_ms

    def read(self, rows: UserRows, s: JoinedImpression, t2_counts: list[int],
             unsettled: list[list[Entry]] | None) -> Snapshot:
        """The snapshot of ``s`` from its user's ``rows`` (every earlier sample's updates staged);
        its T2 count (0 when not clicked) is appended to ``t2_counts``: one per sample, since two
        samples of a user clicked at the same ms can have different counts."""
        imp = s.impression
        ts = imp.ts_ms
        seqs = rows.sequences()
        t = self.seq_len
        parts: list[tuple[int, ...]] = []
        newest = -1
        if unsettled is None:
            for seq in seqs:
                if seq is None:
                    parts += _EMPTY_PAIR
                    continue
                last, items, cats = seq.items_before(ts, t)
                parts += (items, cats)
                if last > newest:
                    newest = last
        else:
            for seq, extra in zip(seqs, (unsettled[0], (), unsettled[1], unsettled[2])):
                last, items, cats = (-1, (), ()) if seq is None else seq.items_before(ts, t)
                more = [e for e in extra if e[0] < ts]
                if more:
                    # stored entries closed before this sample: at equal ts they come first
                    stored = zip(*seq.entries_before(ts, t)) if seq is not None else ()
                    merged = sorted([*stored, *((e[0], e[2], e[3]) for e in more)], key=lambda e: e[0])[-t:]
                    last, items, cats = merged[-1][0], tuple(e[1] for e in merged), tuple(e[2] for e in merged)
                parts += (items, cats)
                if last > newest:
                    newest = last
        if s.clicked:
            c = s.click_ts_ms
            lo = c - self.t2_window_ms
            n_clicks = 0 if seqs[0] is None else seqs[0].count_before(c, self.max_len, lo)
            if unsettled is not None:
                n_clicks += sum(1 for e in unsettled[0] if lo <= e[0] < c)
            t2_counts.append(n_clicks)
        else:
            t2_counts.append(0)
        if newest < 0:  # every sequence empty (entry times are >= 0)
            return EMPTY_SNAPSHOT
        return Snapshot.prechecked(parts, newest)   # parts in SequenceKind order = the field order


def stage_user(rows: UserRows, s: JoinedImpression) -> None:
    """The sample's own entries, each at the time it became known: a click at the first click,
    an unclick at the close (only then is the impression known to be unclicked), a like or
    dislike at the first like or dislike. ``rows``: the sample's user's."""
    imp = s.impression
    item, cat = imp.item_id, imp.item_category
    rows.add_user_event(_N_IMPRESSION, imp.ts_ms)
    if s.clicked:
        rows.add_sequence_event(_CLICK, item, cat, s.click_ts_ms)
        rows.add_user_event(_N_CLICK, s.click_ts_ms)
    else:
        rows.add_sequence_event(_UNCLICK, item, cat, s.label_ts_ms)
    if s.liked:
        rows.add_sequence_event(_LIKE, item, cat, s.like_ts_ms)
    if s.disliked:
        rows.add_sequence_event(_DISLIKE, item, cat, s.dislike_ts_ms)
