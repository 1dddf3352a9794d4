"""Per-sample user state of the pipeline: the snapshot and T2 count it reads, the entries it stages.

For each sample, in close order, :class:`UserSnapshots` reads the user's four sequences strictly
before the impression's ts (the snapshot) and the user's clicks in ``[click ts - window, click
ts)`` (T2) from the open store transaction, which already holds every earlier sample's updates,
merged with the outcomes of the user's impressions shown before the sample's close that close
after it (:func:`unsettled_entries`); then :func:`stage_user` stages the sample's own entries,
each at the time it became known (docs/joiner.md, section 4 "snapshot" and section 2 "T2").
"""
from __future__ import annotations


from featurestore import CounterKind, SequenceKind
from featurestore import keys as fs_keys
from featurestore.store import StoreBatch
from streams.contracts import Click, Event, Feedback, FeedbackKind, Impression
from streams.joiner.join import JoinedImpression
from streams.samples import Snapshot

#: (entry ts, impression_id, item_id, category) of an outcome not yet in the store
Entry = tuple[int, int, int, int]
#: the impressions pending in the core, per user: (impression, close, attached events)
Pending = dict[int, list[tuple[Impression, int, tuple[Event, ...]]]]
SEQ_KINDS = ((SequenceKind.CLICK, "click"), (SequenceKind.UNCLICK, "unclick"),
             (SequenceKind.LIKE, "like"), (SequenceKind.DISLIKE, "dislike"))


def unsettled_entries(joined: list[JoinedImpression], idx: int, by_user: dict[int, list[int]],
                      pending: Pending) -> list[list[Entry]]:
    """Click, like and dislike entries of the user's impressions that close after ``joined[idx]``
    but were shown before its close, with entry ts before that close.

    Those impressions are later in ``joined`` (their outcome is final) or pending in the core.
    Under the lateness bound every event with ts < the sample's close has arrived when the
    sample is emitted, and a pending impression's close can only move to a time >= the
    watermark then; so its outcomes before that close are final too, and the result does not
    depend on how the input was cut into batches. Sorted by ``(ts, impression_id)``.
    """
    s = joined[idx]
    cut = s.label_ts_ms
    user = s.impression.user_id
    out: list[list[Entry]] = [[], [], []]  # click, like, dislike
    for k in by_user[user]:
        if k <= idx:
            continue
        o = joined[k]
        imp = o.impression
        if imp.ts_ms >= cut:
            continue
        for lst, t in zip(out, (o.click_ts_ms, o.like_ts_ms, o.dislike_ts_ms)):
            if 0 <= t < cut:
                lst.append((t, imp.impression_id, imp.item_id, imp.item_category))
    for imp, _close, events in pending.get(user, ()):
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
    for lst in out:
        lst.sort()
    return out


class UserSnapshots:
    """Reads a sample's snapshot (``seq_len`` entries per sequence) and T2 count (the clicks in
    ``t2_window_ms`` before its click, from up to ``max_len`` stored clicks)."""

    def __init__(self, seq_len: int, max_len: int, t2_window_ms: int) -> None:
        self.seq_len, self.max_len, self.t2_window_ms = seq_len, max_len, t2_window_ms
        self._keys: dict[int, list[bytes]] = {}

    def user_keys(self, user_id: int) -> list[bytes]:
        """The user's four sequence keys (in :data:`SEQ_KINDS` order), then its counter keys
        (CLICK, IMPRESSION): every user key a sample reads or stages."""
        keys = self._keys.get(user_id)
        if keys is None:
            if len(self._keys) > 100_000:
                self._keys.clear()
            keys = self._keys[user_id] = [fs_keys.user_sequence_key(user_id, k) for k, _ in SEQ_KINDS]
            keys += [fs_keys.user_counter_key(user_id, k) for k in (CounterKind.CLICK, CounterKind.IMPRESSION)]
        return keys

    def read(self, tx: StoreBatch, s: JoinedImpression, clicks: dict[tuple[int, int], int],
             unsettled: list[list[Entry]]) -> Snapshot:
        """The snapshot of ``s``; its T2 count (clicked samples) goes to ``clicks[(user, click ts)]``."""
        imp = s.impression
        ts = imp.ts_ms
        # the four sequences only (user_features would also decode the counters); staged updates seen
        seqs = tx._load_many(self.user_keys(imp.user_id)[:4], tx._decode_sequence)
        t = self.seq_len
        parts: list[tuple[int, ...]] = []
        newest = -1
        for seq, extra in zip(seqs, (unsettled[0], (), unsettled[1], unsettled[2])):
            if seq is None:
                times, items, cats = (), (), ()
            else:
                times, items, cats = seq.entries_before(ts, t)
            more = [e for e in extra if e[0] < ts] if extra else None
            if more:
                # stored entries closed before this sample: at equal ts they come first
                merged = sorted([*zip(times, items, cats), *((e[0], e[2], e[3]) for e in more)],
                                key=lambda e: e[0])[-t:]
                times, items, cats = (merged[-1][0],), [e[1] for e in merged], [e[2] for e in merged]
            if items:
                parts += (tuple(items), tuple(cats))
                if times[-1] > newest:
                    newest = times[-1]
            else:
                parts += ((), ())
        if s.clicked:
            c = s.click_ts_ms
            lo = c - self.t2_window_ms
            n_clicks = 0 if seqs[0] is None else seqs[0].count_before(c, self.max_len, lo)
            n_clicks += sum(1 for e in unsettled[0] if lo <= e[0] < c)
            clicks[(imp.user_id, c)] = n_clicks
        return Snapshot.prechecked(parts, newest)   # parts in SEQ_KINDS order = the field order


def stage_user(tx: StoreBatch, s: JoinedImpression, keys: list[bytes]) -> None:
    """The sample's own entries, each at the time it became known: a click at the first click,
    an unclick at the close (only then is the impression known to be unclicked), a like or
    dislike at the first like or dislike. ``keys``: :meth:`UserSnapshots.user_keys` of its user."""
    imp = s.impression
    user, item, cat = imp.user_id, imp.item_id, imp.item_category
    tx.add_user_event(user, CounterKind.IMPRESSION, imp.ts_ms, key=keys[5])
    if s.clicked:
        tx.add_sequence_event(user, SequenceKind.CLICK, item, cat, s.click_ts_ms, key=keys[0])
        tx.add_user_event(user, CounterKind.CLICK, s.click_ts_ms, key=keys[4])
    else:
        tx.add_sequence_event(user, SequenceKind.UNCLICK, item, cat, s.label_ts_ms, key=keys[1])
    if s.liked:
        tx.add_sequence_event(user, SequenceKind.LIKE, item, cat, s.like_ts_ms, key=keys[2])
    if s.disliked:
        tx.add_sequence_event(user, SequenceKind.DISLIKE, item, cat, s.dislike_ts_ms, key=keys[3])
