"""Join core: exactly once, order independence within the lateness bound, grace, orphans, late,
early emission, watermark, duplicates, state round trip. A plain reference computes the expected
samples from the set of events."""
from __future__ import annotations

import dataclasses
import doctest
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import streams.joiner.config as config_module
import streams.joiner.join as join_module
import streams.joiner.records as records_module
from streams.contracts import Click, Dwell, Feedback, FeedbackKind, Impression
from streams.joiner import JoinCore, JoinedImpression, JoinerConfig

CFG = JoinerConfig(allowed_lateness_ms=1_000, label_window_ms=10_000, grace_ms=2_000, orphan_grace_ms=3_000,
                   final_dwell_settle_ms=500, emitted_retention_ms=20_000)
EARLY = dataclasses.replace(CFG, emit_early_on_final_dwell=True)
#: allowed lateness = the grace period: deliveries shuffled within the grace period
GRACE = dataclasses.replace(CFG, allowed_lateness_ms=CFG.grace_ms)


def reference(events, cfg: JoinerConfig) -> dict[int, JoinedImpression]:
    """The samples straight from the definition, for streams that respect the lateness bound."""
    imps, outcomes, seen = {}, {}, set()
    for e in events:
        if e.event_id in seen:
            continue
        seen.add(e.event_id)
        if type(e) is Impression:
            imps.setdefault(e.impression_id, e)
        else:
            outcomes.setdefault(e.impression_id, []).append(e)
    out = {}
    for k, imp in imps.items():
        ts = imp.ts_ms
        att = [o for o in outcomes.get(k, []) if ts - cfg.grace_ms <= o.ts_ms < ts + cfg.label_window_ms]
        close = ts + cfg.label_window_ms
        clicks = [o.ts_ms for o in att if type(o) is Click]
        dwells = [o.ts_ms for o in att if type(o) is Dwell]
        if cfg.emit_early_on_final_dwell and clicks and dwells:
            close = min(close, max(min(clicks), min(dwells), ts) + cfg.final_dwell_settle_ms)
        inc = [o for o in att if o.ts_ms < close]
        inc_clicks = [o.ts_ms for o in inc if type(o) is Click]
        inc_dwells = sorted((o for o in inc if type(o) is Dwell), key=lambda d: (d.ts_ms, d.event_id))
        likes = [o.ts_ms for o in inc if type(o) is Feedback and o.kind == FeedbackKind.LIKE]
        dislikes = [o.ts_ms for o in inc if type(o) is Feedback and o.kind == FeedbackKind.DISLIKE]
        out[k] = JoinedImpression(
            imp, bool(inc_clicks), min(inc_clicks, default=-1),
            inc_dwells[-1].dwell_ms if inc_dwells else -1, inc_dwells[-1].ts_ms if inc_dwells else -1,
            bool(likes), bool(dislikes), close, close != ts + cfg.label_window_ms,
            min(likes, default=-1), min(dislikes, default=-1))
    return out


@st.composite
def event_sets(draw, max_impressions: int = 12):
    """Impressions with clicks, dwell and feedback around them (some before the grace, some after
    the window), plus outcomes whose impression never comes. Offsets stay below the retention."""
    ids = itertools.count(1)
    events, t = [], 10_000
    offset = st.integers(-3_000, 15_000)
    for k in range(draw(st.integers(0, max_impressions))):
        t += draw(st.integers(0, 4_000))
        user, item = draw(st.integers(0, 2)), draw(st.integers(0, 4))
        events.append(Impression(next(ids), t, user, item, 100 + k, activeness=draw(st.integers(0, 8))))
        for _ in range(draw(st.integers(0, 2))):
            events.append(Click(next(ids), t + draw(offset), 100 + k, user, item))
        for _ in range(draw(st.integers(0, 2))):
            events.append(Dwell(next(ids), t + draw(offset), 100 + k, user, item, draw(st.integers(0, 90_000))))
        for _ in range(draw(st.integers(0, 1))):
            kind = draw(st.sampled_from(list(FeedbackKind)))
            events.append(Feedback(next(ids), t + draw(offset), user, item, kind, 100 + k))
    for j in range(draw(st.integers(0, 2))):
        events.append(Click(next(ids), draw(st.integers(0, t + 1)), 10_000 + j, 0, 0))
    return sorted(events, key=lambda e: (e.ts_ms, e.event_id))


@st.composite
def deliveries(draw, cfg: JoinerConfig = CFG):
    """(events, arrival order): duplicates added, then each delivery delayed by at most the lateness."""
    events = draw(event_sets())
    copies = events + [e for e in events if draw(st.integers(0, 9)) == 0]
    jitter = [draw(st.integers(0, cfg.allowed_lateness_ms)) for _ in copies]
    order = sorted(range(len(copies)), key=lambda i: (copies[i].ts_ms + jitter[i], i))
    return events, [copies[i] for i in order]


def run(events, cfg: JoinerConfig, chunk: int | None = None):
    core = JoinCore(cfg)
    outs = []
    step = chunk or max(1, len(events))
    for i in range(0, len(events), step):
        outs.append(core.process(events[i:i + step]))
    outs.append(core.flush())
    samples = [s for o in outs for s in o.samples]
    late = [x for o in outs for x in o.late]
    orphans = [x for o in outs for x in o.orphans]
    return core, samples, late, orphans


def test_doctests_run_and_pass():
    for module in (join_module, records_module, config_module):
        result = doctest.testmod(module)
        assert result.attempted >= 2 and result.failed == 0


def test_joined_impression_builds_the_same_frozen_record():
    imp = Impression(1, 100, 2, 3, 4)
    values = (imp, True, 5, 6, 7, False, True, 8, True, 9, 10)  # a distinct value per field
    fast = records_module.joined_impression(*values)
    assert type(fast) is JoinedImpression and fast == JoinedImpression(*values)
    assert tuple(getattr(fast, f.name) for f in dataclasses.fields(JoinedImpression)) == values
    assert hash(fast) == hash(JoinedImpression(*values)) and repr(fast) == repr(JoinedImpression(*values))
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.clicked = False


@pytest.mark.parametrize("cfg", [CFG, EARLY], ids=["window", "early"])
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_exactly_one_sample_per_impression_matching_reference(cfg, data):
    events, arrivals = data.draw(deliveries(cfg))
    core, samples, late, orphans = run(arrivals, cfg)
    ids = [s.impression.impression_id for s in samples]
    assert len(ids) == len(set(ids))
    assert all(s.label_ts_ms > s.impression.ts_ms for s in samples)  # the sample contract's rule
    assert {s.impression.impression_id: s for s in samples} == reference(events, cfg)
    n = core.counters()
    assert n["emitted"] == len(samples) == len({e.impression_id for e in events if type(e) is Impression})
    assert n["duplicate"] == len(arrivals) - len(events)
    # every distinct outcome is accounted for exactly once: in a sample, late, or orphan
    joined_ids = {e.event_id for e in events if type(e) is not Impression}
    assert len(late) + len(orphans) == len({x.event.event_id for x in late + orphans})
    assert {x.event.event_id for x in late + orphans} <= joined_ids
    assert n["late"] == len(late) and n["orphan"] == len(orphans)
    assert n["pending"] == n["buffered"] == 0


@pytest.mark.parametrize("cfg", [CFG, EARLY, GRACE], ids=["window", "early", "lateness_is_grace"])
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_shuffle_and_duplicates_within_lateness_do_not_change_output(cfg, data):
    events, arrivals = data.draw(deliveries(cfg))
    _c, base, base_late, base_orphans = run(events, cfg)
    _c, samples, late, orphans = run(arrivals, cfg, chunk=data.draw(st.integers(1, 7)))
    key = lambda s: s.impression.impression_id  # noqa: E731
    assert sorted(samples, key=key) == sorted(base, key=key)
    assert {x.event.event_id for x in late} == {x.event.event_id for x in base_late}
    assert {(x.event.event_id, x.reason) for x in orphans} == {(x.event.event_id, x.reason) for x in base_orphans}


@pytest.mark.parametrize("cfg", [CFG, EARLY], ids=["window", "early"])
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_state_round_trip_mid_stream_gives_identical_output(cfg, data):
    _events, arrivals = data.draw(deliveries(cfg))
    split = data.draw(st.integers(0, len(arrivals)))
    full, samples, late, orphans = run(arrivals, cfg)
    first = JoinCore(cfg)
    out1 = first.process(arrivals[:split])
    restored = JoinCore.from_bytes(first.to_bytes(), cfg)
    assert restored.to_bytes() == first.to_bytes()
    assert restored.watermark_ms == first.watermark_ms
    out2 = restored.process(arrivals[split:])
    out3 = restored.flush()
    assert out1.samples + out2.samples + out3.samples == samples
    assert out1.late + out2.late + out3.late == late
    assert out1.orphans + out2.orphans + out3.orphans == orphans
    assert restored.counters() == full.counters()


def imp(ts, k=7, eid=None):
    return Impression(eid or k * 10, ts, 1, 9, k)


def test_click_before_impression_within_grace_attaches():
    core = JoinCore(CFG)
    assert core.process([Click(2, 99_000, 7, 1, 9), Dwell(3, 99_500, 7, 1, 9, 8_000)]).samples == []
    assert core.counters()["buffered"] == 2
    core.process([imp(100_000)])
    [s] = core.flush().samples
    assert (s.clicked, s.click_ts_ms, s.dwell_ms) == (True, 99_000, 8_000)


def test_outcome_before_grace_is_an_orphan_and_missing_impression_orphans_after_grace():
    core = JoinCore(CFG)
    out = core.process([Click(2, 97_999, 7, 1, 9), imp(100_000), Click(3, 101_000, 8, 1, 9)])
    assert [(o.event.event_id, o.reason) for o in out.orphans] == [(2, "before_impression")]
    # the click for impression 8 waits until the watermark passes its ts + orphan grace
    assert core.advance(101_000 + 3_000 + 1_000).orphans == []  # W = 103_000: not past 104_000
    out = core.advance(105_001)  # W = 104_001 > 104_000
    assert [(o.event.event_id, o.reason) for o in out.orphans] == [(3, "no_impression")]
    assert core.counters()["orphan"] == 2


def test_event_after_emission_is_late_and_after_window_is_late():
    core = JoinCore(CFG)
    core.process([imp(100_000), Click(2, 109_999, 7, 1, 9), Click(3, 110_000, 7, 1, 9)])
    out = core.advance(111_000)  # W = 110_000 = ts + window: emitted now
    assert [s.label_ts_ms for s in out.samples] == [110_000]
    assert [(x.event.event_id, x.reason) for x in out.late] == []
    out = core.process([Feedback(4, 105_000, 1, 9, FeedbackKind.LIKE, 7)])
    assert [(x.event.event_id, x.reason) for x in out.late] == [(4, "after_emit")]
    # click 3 was outside the window: late when it arrived
    assert core.counters()["late"] == 2 and core.counters()["emitted"] == 1


def test_watermark_semantics():
    core = JoinCore(CFG)
    assert core.watermark_ms is None
    core.process([imp(100_000)])
    assert core.watermark_ms == 99_000
    assert core.advance(110_999).samples == []  # W = 109_999 < 110_000
    assert core.advance(50_000).samples == [] and core.watermark_ms == 109_999  # never moves back
    assert len(core.advance(111_000).samples) == 1
    # an impression whose window already closed is late, not a sample
    out = core.process([imp(99_000, k=8)])
    assert [(x.event.impression_id, x.reason) for x in out.late] == [(8, "window_closed")]
    # an out-of-bound event is still used while its impression is pending
    core.process([imp(105_000, k=9), Click(91, 104_000, 9, 1, 9)])
    [s] = core.flush().samples
    assert s.clicked


def test_early_emission_when_clicked_and_dwell_final():
    core = JoinCore(EARLY)
    core.process([imp(100_000), Click(2, 101_000, 7, 1, 9), Dwell(3, 120_000 - 15_000, 7, 1, 9, 4_000)])
    # close = max(101_000, 105_000) + 500 = 105_500: emitted once W >= 105_500
    assert core.process([Feedback(4, 105_400, 1, 9, FeedbackKind.LIKE, 7),
                         Feedback(6, 105_500, 1, 9, FeedbackKind.DISLIKE, 7)]).samples == []
    out = core.advance(106_500)
    [s] = out.samples
    assert (s.early, s.label_ts_ms, s.liked, s.disliked, s.dwell_ms) == (True, 105_500, True, False, 4_000)
    assert [(x.event.event_id, x.reason) for x in out.late] == [(6, "after_close")]  # ts == close: out
    out = core.process([Feedback(5, 106_000, 1, 9, FeedbackKind.DISLIKE, 7)])
    assert [(x.event.event_id, x.reason) for x in out.late] == [(5, "after_emit")]
    assert core.counters()["emitted_early"] == 1
    # without the option the same events wait for the window
    core = JoinCore(CFG)
    core.process([imp(100_000), Click(2, 101_000, 7, 1, 9), Dwell(3, 105_000, 7, 1, 9, 4_000)])
    assert core.advance(106_500).samples == []


def test_early_close_is_never_before_the_impression():
    """A click and dwell within the grace before their impression (clock skew) close it no
    earlier than its own ts + settle: a sample never closes before it was shown."""
    core = JoinCore(EARLY)
    out = core.process([Click(2, 98_500, 7, 1, 9), Dwell(3, 99_000, 7, 1, 9, 4_000), imp(100_000)])
    assert out.samples == []
    [s] = core.advance(101_500).samples  # W = 100_500 >= 100_000 + 500
    assert (s.early, s.label_ts_ms, s.clicked, s.dwell_ms) == (True, 100_500, True, 4_000)


def test_attached_event_past_early_close_is_late_at_emission():
    core = JoinCore(EARLY)
    out = core.process([imp(100_000), Feedback(4, 108_000, 1, 9, FeedbackKind.LIKE, 7),
                        Click(2, 101_000, 7, 1, 9), Dwell(3, 102_000, 7, 1, 9, 1_000)])
    assert [(x.event.event_id, x.reason) for x in out.late] == [(4, "after_close")]
    [s] = out.samples  # W = 107_000 >= 102_500
    assert not s.liked


def test_duplicates_are_idempotent():
    core = JoinCore(CFG)
    events = [imp(100_000), Click(2, 100_500, 7, 1, 9), Click(2, 100_500, 7, 1, 9), imp(100_000),
              Impression(99, 100_001, 1, 9, 7)]  # a second impression reusing the id: first wins
    core.process(events)
    [s] = core.advance(112_000).samples
    assert s.impression.event_id == 70 and core.counters()["duplicate"] == 3
    core.process([Click(2, 100_500, 7, 1, 9)])  # after emission, still a duplicate, not late
    assert core.counters()["duplicate"] == 4 and core.counters()["late"] == 0


def test_feedback_without_impression_id_is_an_orphan_once():
    """An orphan at once, and a redelivery is a duplicate (its id is retained like an emitted
    impression's, also across a rebuild from the state records or the older blob) until the
    watermark passes its retention."""
    fb = Feedback(1, 5_000, 1, 9, FeedbackKind.LIKE, None)
    core = JoinCore(CFG)
    out = core.process([fb, fb])
    assert [(o.event.event_id, o.reason) for o in out.orphans] == [(1, "no_impression_id")]
    assert core.counters()["duplicate"] == 1 and core.counters()["orphan"] == 1
    rows = {k: v for k, v in core.state_changes()}
    for again in (JoinCore.from_state(sorted(rows.items()), CFG), JoinCore.from_bytes(core.to_bytes(), CFG)):
        assert not again.process([fb]).orphans and again.counters()["duplicate"] == 2
    core.process([imp(5_000 + 20_000 + 1_000)])  # the watermark passes the retention: forgotten
    [retained] = [k for k in rows if k != min(rows)]  # min: the header
    assert (retained, None) in core.state_changes() and core.counters()["retained"] == 0
    assert len(core.process([fb]).orphans) == 1


def test_emitted_impressions_are_forgotten_after_retention():
    core = JoinCore(CFG)
    core.process([imp(100_000)])
    core.advance(111_000)
    assert core.counters()["retained"] == 1
    core.advance(110_000 + 20_000 + 1_000)
    assert core.counters()["retained"] == 0


# state version 1 of one pending record (click, dwell, like attached), one waiting click and one
# emitted record: stores and changelogs written before keep restoring to the same state
STATE_V1 = bytes.fromhex(
    "53524a0001f4330000000000000600000000000000020000000000000001000000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000100000003000000355a01010300000000000000c8320000000000"
    "0005000000000000000800000000000000470000000000000000ff00000000ffffffff2f5a010304000000000000002c"
    "33000000000000470000000000000005000000000000000800000000000000840300002c5a0104050000000000000090"
    "330000000000000500000000000000080000000000000001470000000000000003000000030000000000000004000000"
    "000000000500000000000000010000002b5a01020600000000000000f433000000000000630000000000000005000000"
    "000000000900000000000000010000004600000000000000f82a00000000000002000000010000000000000002000000"
    "00000000"
)


def test_state_format_version_1_is_kept():
    core = JoinCore(CFG)
    core.process([Impression(1, 1_000, 5, 6, 70), Click(2, 1_500, 70, 5, 6), Impression(3, 13_000, 5, 8, 71),
                  Dwell(4, 13_100, 71, 5, 8, 900), Feedback(5, 13_200, 5, 8, FeedbackKind.LIKE, 71),
                  Click(6, 13_300, 99, 5, 9)])
    assert core.to_bytes() == STATE_V1
    restored = JoinCore.from_bytes(STATE_V1, CFG)
    assert restored.to_bytes() == STATE_V1 and restored.counters() == core.counters()
    assert restored.flush() == core.flush()


def test_corrupt_state_is_rejected():
    core = JoinCore(CFG)
    core.process([imp(100_000), Click(2, 99_000, 8, 1, 9)])
    data = core.to_bytes()
    with pytest.raises(ValueError, match="bad magic"):
        JoinCore.from_bytes(b"XXXX" + data[4:], CFG)
    with pytest.raises(ValueError, match="trailing"):
        JoinCore.from_bytes(data + b"\x00", CFG)
    with pytest.raises(ValueError, match="version"):
        JoinCore.from_bytes(data[:4] + b"\x09" + data[5:], CFG)
    with pytest.raises(ValueError, match="truncated"):
        JoinCore.from_bytes(data[:-3], CFG)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="orphan_grace_ms=10 < grace_ms=20"):
        JoinerConfig(grace_ms=20, orphan_grace_ms=10)
    with pytest.raises(ValueError, match="label_window_ms=0"):
        JoinerConfig(label_window_ms=0)
    with pytest.raises(ValueError, match="user_group_fields"):
        JoinerConfig(user_group_fields=("gender",))


def test_outcomes_waiting_for_a_window_closed_impression_are_late_with_it():
    core = JoinCore(CFG)
    core.process([Click(2, 109_000, 7, 1, 9), Impression(50, 112_000, 2, 3, 50)])  # W = 111_000
    out = core.process([imp(100_000)])
    assert [(x.event.event_id, x.reason) for x in out.late] == [(70, "window_closed"), (2, "window_closed")]
    assert core.counters()["buffered"] == 0


def test_outcome_naming_another_user_or_item_is_an_orphan():
    core = JoinCore(CFG)
    out = core.process([Click(2, 100_500, 7, 2, 9), imp(100_000), Dwell(3, 100_600, 7, 1, 8, 9_000)])
    assert [(o.event.event_id, o.reason) for o in out.orphans] == [(2, "mismatch"), (3, "mismatch")]
    [s] = core.flush().samples
    assert not s.clicked and s.dwell_ms == -1


def test_impression_redelivered_after_flush_is_a_duplicate():
    core = JoinCore(JoinerConfig(allowed_lateness_ms=0, label_window_ms=1_000))
    imp = Impression(1, 100, 1, 9, 7)
    core.process([imp])
    assert len(core.flush().samples) == 1
    assert core.process([imp]).samples == [] and core.flush().samples == []
    assert core.counters()["duplicate"] == 1


def test_retention_shorter_than_window_plus_lateness_is_refused():
    with pytest.raises(ValueError, match="emitted_retention_ms"):
        JoinerConfig(label_window_ms=30 * 60_000, allowed_lateness_ms=10_000, emitted_retention_ms=60_000)


def test_pending_records_show_the_not_yet_emitted_impressions_of_the_users_asked():
    core = JoinCore(EARLY)
    other = Impression(80, 100_500, 2, 9, 8)
    core.process([imp(100_000), other, Click(2, 101_000, 7, 1, 9), Feedback(4, 101_500, 1, 9, FeedbackKind.LIKE, 7),
                  Click(5, 99_000, 9, 1, 9)])  # the last one waits for its impression: not attached
    [(i, close, events)] = core.pending_records({1})[1]
    assert (i, close, [e.event_id for e in events]) == (imp(100_000), 110_000, [2, 4])
    assert core.pending_records([1, 2])[2] == [(other, 110_500, ())]
    assert core.pending_records(set()) == {} and core.pending_records({3}) == {}
    core.process([Dwell(3, 102_000, 7, 1, 9, 4_000)])
    assert core.pending_records({1})[1][0][1] == 102_500  # the early close, before emission
    core.advance(120_000)
    assert core.pending_records({1, 2}) == {}


def _held(core: JoinCore):
    """Everything a core holds, independent of dict insertion order."""
    pending = {k: (p.impression, tuple(p.events), frozenset(p.ids), p.close, p.first_click, p.first_dwell)
               for k, p in core._pending.items()}
    waiting = {k: tuple(v) for k, v in core._buffer.items()}
    emitted = {k: (close, frozenset(ids)) for k, (close, ids) in core._emitted.items()}
    return pending, waiting, emitted, core.watermark_ms, core.counters()


@pytest.mark.parametrize("cfg", [CFG, EARLY], ids=["window", "early"])
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_state_records_applied_after_every_chunk_rebuild_the_core(cfg, data):
    """state_changes() written into a key-value store after each chunk (None deletes) is the whole
    state at every point: a core rebuilt from it holds the same and continues identically."""
    _events, arrivals = data.draw(deliveries(cfg))
    chunk = data.draw(st.integers(1, 7))
    core, store = JoinCore(cfg), {}
    _c, samples, late, orphans = run(arrivals, cfg)
    outs = []
    for i in range(0, len(arrivals) + chunk, chunk):
        outs.append(core.process(arrivals[i:i + chunk]))
        for key, value in core.state_changes():
            if value is None:
                assert key in store  # only what was written is deleted
                del store[key]
            else:
                store[key] = value
        rebuilt = JoinCore.from_state(sorted(store.items()), cfg)
        assert _held(rebuilt) == _held(core)
        if data.draw(st.booleans()):
            core = rebuilt  # go on from the stored state
    outs.append(core.flush())
    assert [s for o in outs for s in o.samples] == samples
    assert [x for o in outs for x in o.late] == late and [x for o in outs for x in o.orphans] == orphans


def test_state_records_reject_corrupt_values():
    core = JoinCore(CFG)
    core.process([Impression(1, 100, 2, 3, 4), Click(2, 150, 9, 2, 3)])
    rows = dict(core.state_changes())
    assert JoinCore.from_state(sorted(rows.items()), CFG) is not None
    assert JoinCore.from_state([], CFG) is None
    header, pending = sorted(rows)[:2]
    for bad in ({**rows, header: rows[header][:-1]}, {**rows, pending: rows[pending] + b"\x00"},
                {k: v for k, v in rows.items() if k != header}):
        with pytest.raises(ValueError, match="joiner state"):
            JoinCore.from_state(sorted(bad.items()), CFG)
