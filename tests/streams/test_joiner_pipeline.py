"""JoinerPipeline on rocksdict: a pipeline closed and reopened from its store at any commit continues
exactly as one that never stopped; uncommitted work is dropped and redone; counters persist."""
from __future__ import annotations

import contextlib
import dataclasses
import doctest
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import streams.joiner.worker as worker_module
from streams.contracts import Click, Dwell, Feedback, FeedbackKind, Impression
from streams.joiner import RULE_T2, JoinerConfig
from featurestore import RocksFeatureStore
from streams.joiner.pipeline import JoinerPipeline, PipelineConfig, PipelineOutput, open_pipeline
from streams.replay import iter_events
from streams.samples import decode, snapshot_is_point_in_time
from tests.streams.test_joiner_core import CFG, GRACE, deliveries

REPO_ROOT = Path(__file__).resolve().parents[2]
SLICE = REPO_ROOT / "data" / "kuairand-slice" / "log_standard_slice.csv.gz"


@pytest.fixture(scope="module")
def events():
    evs = list(iter_events([SLICE]))
    return [e for e in evs if e.ts_ms < evs[0].ts_ms + 2 * 3_600_000]


def run_all(pipe: JoinerPipeline, events, batch: int) -> list[bytes]:
    out = []
    for i in range(0, len(events), batch):
        out += pipe.process(events[i:i + batch]).samples
        pipe.commit({"all": i + batch})
    out += pipe.finish().samples
    pipe.commit()
    return out


def process_all(path, events, config: PipelineConfig, remote=None, batch: int | None = None,
                partition: int = 0) -> tuple[PipelineOutput, dict]:
    """A fresh pipeline at ``path`` fed ``events`` (``batch`` at a time, default all at once),
    then finished and committed: everything it output, and its counters."""
    pipe = open_pipeline(path, partition, config, remote)
    out, step = PipelineOutput(), batch or max(1, len(events))
    for i in range(0, len(events), step):
        out.extend(pipe.process(events[i:i + step]))
    out.extend(pipe.finish())
    pipe.commit()
    counters = pipe.counters()
    pipe.close()
    return out, counters


def test_reopen_at_every_commit_point_gives_the_same_samples(events, tmp_path):
    cfg = PipelineConfig()
    ref_pipe = open_pipeline(tmp_path / "ref", 0, cfg)
    ref = run_all(ref_pipe, events, 500)
    ref_pipe.close()
    assert len(ref) == sum(type(e) is Impression for e in events)

    path = tmp_path / "restarted"
    got, pos, batch = [], 0, 500
    pipe = open_pipeline(path, 0, cfg)
    while pos < len(events):
        got += pipe.process(events[pos:pos + batch]).samples
        pipe.commit({"all": pos + batch})
        # uncommitted work is lost with the process: redone from the committed offset
        pipe.process(events[pos + batch:pos + 2 * batch])
        pipe.close()
        pipe = open_pipeline(path, 0, cfg)
        pos = pipe.committed_offset("all")
        batch = 137 if batch == 500 else 500
    got += pipe.finish().samples
    pipe.commit()
    assert got == ref
    assert pipe.counters()["samples"] == len(ref)
    pipe.close()


def test_samples_do_not_depend_on_batch_size(events, tmp_path):
    cfg = PipelineConfig()
    a = run_all(open_pipeline(tmp_path / "a", 0, cfg), events, 1)
    b = run_all(open_pipeline(tmp_path / "b", 0, cfg), events, 10_000)
    assert a == b


def test_dead_letters_are_counted_and_persisted(tmp_path):
    cfg = PipelineConfig()
    pipe = open_pipeline(tmp_path / "s", 3, cfg)
    pipe.count_dead_letter("clicks", "bad_magic", 2)
    pipe.commit({"clicks": 5})
    pipe.close()
    pipe = open_pipeline(tmp_path / "s", 3, cfg)
    c = pipe.counters()
    assert (c["dead_letter"], c["dead_letter.clicks.bad_magic"]) == (2, 2)
    assert pipe.committed_offset("clicks") == 5 and pipe.committed_offset("dwell") is None
    pipe.close()


def test_config_rejects_short_store_sequences():
    from featurestore import FeatureStoreConfig, SequenceConfig
    from streams.joiner import JoinerConfig

    with pytest.raises(ValueError, match="seq_len"):
        PipelineConfig(joiner=JoinerConfig(seq_len=200), store=FeatureStoreConfig(sequences=SequenceConfig(max_len=100)))
    with pytest.raises(ValueError, match="stats_epoch_ms"):
        PipelineConfig(stats_epoch_ms=0)


def test_doctests():
    import streams.samples_file as samples_file_module
    for module in (worker_module, samples_file_module):
        assert doctest.testmod(module).failed == 0


T0 = 1_650_000_000_000
MIN = 60_000


def samples_of(path, events, batch: int, **joiner) -> dict:
    """impression_id -> decoded sample, the events fed in ts order ``batch`` at a time."""
    events = sorted(events, key=lambda e: e.ts_ms)
    pipe = open_pipeline(path, 0, PipelineConfig(joiner=JoinerConfig(**joiner)))
    out = run_all(pipe, events, batch)
    pipe.close()
    return {s.impression_id: s for s in map(decode, out)}


def user_imp(k: int, ts_ms: int, item: int) -> Impression:
    return Impression(k, ts_ms, 1, item, k, item_category=item % 5)


def test_a_later_outcome_of_an_earlier_impression_does_not_leak_into_the_snapshot(tmp_path):
    """Impression I at 0, J of the same user at 1 min: J's snapshot is the same whether I is clicked
    and liked at 10 min or never, and a later impression K (at 40 min) sees what became of I."""
    base = [user_imp(1, T0, 10), user_imp(2, T0 + MIN, 11), user_imp(3, T0 + 40 * MIN, 12)]
    outcome = [Click(101, T0 + 10 * MIN, 1, 1, 10), Feedback(102, T0 + 10 * MIN, 1, 10, FeedbackKind.LIKE, 1)]
    for batch in (1, 100):
        quiet = samples_of(tmp_path / f"q{batch}", base, batch)
        acted = samples_of(tmp_path / f"a{batch}", base + outcome, batch)
        assert quiet[2].snapshot == acted[2].snapshot
        assert quiet[2].snapshot.sequence("unclick") == acted[2].snapshot.sequence("unclick") == ((), ())
        assert quiet[2].snapshot.sequence("like") == acted[2].snapshot.sequence("like") == ((), ())
        assert quiet[2].snapshot.newest_ts_ms == -1
        # I's unclick is known at its close (30 min), its click and like at 10 min
        assert quiet[3].snapshot.sequence("unclick") == ((10, 11), (0, 1))
        assert quiet[3].snapshot.newest_ts_ms == T0 + 31 * MIN
        assert acted[3].snapshot.sequence("click") == acted[3].snapshot.sequence("like") == ((10,), (0,))
        assert acted[3].snapshot.sequence("unclick") == ((11,), (1,))
        assert acted[1].liked and acted[1].clicked
        for s in (*quiet.values(), *acted.values()):
            assert snapshot_is_point_in_time(s)


def test_t2_counts_clicks_of_impressions_that_close_later(tmp_path):
    """Impression A at 0 clicked at 20 min; seven more of the same user at 1..7 min, each clicked
    5 s after it: A's click has 7 clicks before it in the 7 days, so A's user is not light (no T2),
    though A closes (30 min) before any of the seven."""
    events = [user_imp(100, T0, 50), Click(200, T0 + 20 * MIN, 100, 1, 50),
              Dwell(300, T0 + 21 * MIN, 100, 1, 50, 60_000)]
    for m in range(1, 8):
        events += [user_imp(100 + m, T0 + m * MIN, 50 + m), Click(200 + m, T0 + m * MIN + 5_000, 100 + m, 1, 50 + m),
                   Dwell(300 + m, T0 + m * MIN + 65_000, 100 + m, 1, 50 + m, 60_000)]
    for batch in (1, 1_000):
        got = samples_of(tmp_path / f"b{batch}", events, batch)
        assert not got[100].rules & RULE_T2
        # the m-th of the seven has m - 1 clicks before its own: all light
        assert all(got[100 + m].rules & RULE_T2 for m in range(1, 8))
        # the snapshots hold only what happened before each impression
        assert got[100].snapshot.sequence("click") == ((), ())
        assert got[107].snapshot.sequence("click")[0] == tuple(range(51, 57))


def test_t2_is_counted_per_sample_even_for_clicks_at_the_same_ms(tmp_path):
    """A (shown at 0) and B (at 10 s) of one user are both clicked at 29:50, six clicks of the user
    before; X is shown at 30:05, after A's close and before B's, and its click at 29:45 came
    before it. X's click is outside A's T2 count (the documented bound: shown at or after A's
    close) and inside B's: 6 clicks for A (light, T2 fires), 7 for B. One count per (user, click
    ts) gave both B's count when both closed in one call."""
    events = []
    for m in range(6):
        events += [user_imp(10 + m, T0 - 60 * MIN + m * MIN, 50 + m),
                   Click(20 + m, T0 - 60 * MIN + m * MIN + 500, 10 + m, 1, 50 + m)]
    c = T0 + 29 * MIN + 50_000
    events += [user_imp(100, T0, 1), user_imp(101, T0 + 10_000, 2), Click(202, T0 + 29 * MIN + 45_000, 102, 1, 3),
               Click(200, c, 100, 1, 1), Click(201, c, 101, 1, 2), user_imp(102, T0 + 30 * MIN + 5_000, 3),
               Impression(300, T0 + 31 * MIN, 2, 9, 300)]  # another user's: moves the watermark past B's close
    for batch in (1, 1_000):
        got = samples_of(tmp_path / f"b{batch}", events, batch)
        assert got[100].rules & RULE_T2, batch
        assert not got[101].rules & RULE_T2, batch


def test_early_emitted_sample_sees_clicks_and_feedback_of_pending_earlier_impressions(tmp_path):
    """With early emission J (at 1 min, clicked, final dwell at 1:40) closes before I (at 0, clicked
    at 5 s and liked at 10 s, no dwell: it waits for its window); J's snapshot still holds I's click
    and like, and a batch cut changes nothing."""
    events = [user_imp(1, T0, 10), Click(11, T0 + 5_000, 1, 1, 10),
              Feedback(12, T0 + 10_000, 1, 10, FeedbackKind.LIKE, 1),
              user_imp(2, T0 + MIN, 11), Click(21, T0 + 70_000, 2, 1, 11), Dwell(22, T0 + 100_000, 2, 1, 11, 30_000),
              Impression(3, T0 + 2 * MIN, 2, 12, 3)]
    ref = None
    for batch in (1, 3, 100):
        got = samples_of(tmp_path / f"b{batch}", events, batch, emit_early_on_final_dwell=True)
        j = got[2]
        assert j.early and j.label_ts_ms < got[1].label_ts_ms
        assert j.snapshot.sequence("click") == j.snapshot.sequence("like") == ((10,), (0,))
        assert j.snapshot.newest_ts_ms == T0 + 10_000
        assert got[1].snapshot.newest_ts_ms == -1
        ref = ref or got
        assert got == ref


def _compact(log, key=0, value=1):
    """What Kafka's log compaction may leave: the last record of each key, in log order, and no
    tombstones (their delete retention passed). ``key``, ``value``: their places in a record."""
    last = {r[key]: i for i, r in enumerate(log)}
    return [r for i, r in enumerate(log) if last[r[key]] == i and r[value] is not None]


def _restore_from(log):
    from streams.joiner.changelog import replay_changelog

    def restore(store):
        res = replay_changelog(lambda: iter([log]), store.apply_changes, len(log))
        return res.n_commits, res.n_records, res.unfinished, False
    return restore


def _store_items(pipe_or_store):
    store = getattr(pipe_or_store, "store", pipe_or_store)
    return {k: v for k, v in store._require_db().items() if not k.endswith(b"changelog.next")}



def test_store_restored_from_its_changelog_continues_like_the_original(events, tmp_path):
    """Every prepared WriteBatch is kept as a changelog. A writer dies mid-batch: a fresh store
    fed the changelog skips the unfinished batch and continues exactly as the original (the same
    samples, the same counters). Its first commit republishes the committed values of the keys
    the unfinished batch wrote last: without it, log compaction (last record per key) removes
    them; with it, a store restored from the compacted changelog equals the restored one."""
    from streams.joiner.changelog import make_tag, marker_key

    cfg = PipelineConfig()
    ref_pipe = open_pipeline(tmp_path / "ref", 0, cfg)
    ref = run_all(ref_pipe, events, 500)
    ref_counters = ref_pipe.counters()
    ref_pipe.close()
    log: list[tuple[bytes, bytes | None, bytes]] = []

    def commit(pipe, writer, offsets):
        seq, changes = pipe.prepare(offsets)
        tag = make_tag(writer, seq)
        log.extend([(k, v, tag) for k, v in changes] + [(marker_key(writer), tag, tag)])
        pipe.commit_prepared({b"changelog.next": str(len(log)).encode()})

    pipe = open_pipeline(tmp_path / "a", 0, cfg)
    got, cut = [], len(events) // 2
    for i in range(0, cut, 500):
        got += pipe.process(events[i:min(i + 500, cut)]).samples
        commit(pipe, 1, {"all": min(i + 500, cut)})
    committed = _store_items(pipe)
    pipe.process(events[cut:cut + 500])  # a batch whose writer dies before its commit record
    seq, changes = pipe.prepare({"all": cut + 500})
    log += [(k, v, make_tag(1, seq)) for k, v in changes[:-1]]
    pipe.close()

    lost = RocksFeatureStore(tmp_path / "lost", cfg.store)
    _restore_from(_compact(log))(lost)
    # compaction took the committed values the batch overwrote (the join core's header among them)
    assert {k: v for k, v in lost._require_db().items()}.items() < committed.items()
    lost.close()
    pipe = open_pipeline(tmp_path / "b", 0, cfg, restore=_restore_from(log))
    assert _store_items(pipe) == committed  # the unfinished batch is not applied
    assert pipe.committed_offset("all") == cut and pipe.counters()["restored_from_changelog"] == 1
    assert pipe.republish_staged and pipe.counters()["changelog_republished"] > 100
    commit(pipe, 2, {"all": cut})  # what the worker does right after such a restore
    again = open_pipeline(tmp_path / "c", 0, cfg, restore=_restore_from(_compact(log)))
    assert _store_items(again) == _store_items(pipe)
    assert sum(k.startswith(b"\xff") for k, _v, _t in _compact(log)) == 2  # one marker per writer
    again.close()
    for i in range(cut, len(events), 500):
        got += pipe.process(events[i:i + 500]).samples
        pipe.commit({"all": i + 500})
    got += pipe.finish().samples
    pipe.commit()
    assert got == ref
    assert {k: v for k, v in pipe.counters().items()
            if not k.startswith("restored") and k != "changelog_republished"} == ref_counters
    pipe.close()


def test_runtime_republishes_after_a_writer_died_mid_changelog_batch(events, tmp_path):
    """The worker's runtime over an in-memory changelog: the first owner dies while producing a
    batch to the changelog; a second owner without the store restores it, and commits the
    republished keys at once, before reading any event; a third owner restoring from the
    compacted changelog then holds exactly the second's state."""
    import asyncio

    from streams.joiner.app import JoinerAppConfig, JoinerRuntime
    from streams.joiner.changelog import HEADER_TAG, TOPIC_STORE_CHANGELOG, replay_changelog
    from tests.streams.runtime_fakes import acked, consumed

    msgs = consumed(events)
    log: list[tuple[bytes, bytes | None, bytes]] = []
    ends: dict[str, int] = {}
    fail_after = [None]

    async def send(topic, key, value, partition, headers):
        if topic == TOPIC_STORE_CHANGELOG:
            if fail_after[0] is not None:
                if fail_after[0] == 0:
                    raise ConnectionError("broker gone")
                fail_after[0] -= 1
            log.append((key, value, dict(headers)[HEADER_TAG]))
        ends[topic] = ends.get(topic, 0) + 1
        return acked(ends[topic] - 1)

    def restore(p, start, apply):
        return replay_changelog(lambda: iter([log[start:]]), apply, len(log))

    def runtime(data_dir):
        return JoinerRuntime(JoinerAppConfig(data_dir=data_dir, pipeline=PipelineConfig()), send=send,
                             read_back=lambda topic, p, start: [], caught_up=lambda *a: True, restore=restore)

    async def first_life():
        rt = runtime(tmp_path / "one")
        await rt.position(0)
        half = len(msgs) // 2
        for i in range(0, half, 1000):
            await rt.handle(msgs[i:min(i + 1000, half)])
        fail_after[0] = 200
        with pytest.raises(ConnectionError):
            await rt.handle(msgs[half:half + 1000])
        rt.close()

    async def open_only(data_dir):
        rt = runtime(data_dir)
        await rt.position(0)
        pipe = rt.partitions[0].pipeline
        items, counters = _store_items(pipe), pipe.counters()
        rt.close()
        return items, counters

    asyncio.run(first_life())
    fail_after[0] = None
    n_before = len(log)
    second, counters = asyncio.run(open_only(tmp_path / "two"))
    assert counters["restored_from_changelog"] == 1 and counters["changelog_republished"] > 0
    assert len(log) > n_before  # committed at once: the republished values follow the unfinished batch
    log[:] = _compact(log)
    third, _ = asyncio.run(open_only(tmp_path / "three"))
    assert third == second



def test_a_commit_writes_the_join_state_that_changed_not_all_of_it(events, tmp_path):
    """The join core's state goes to the store as one record per held impression: a small batch's
    commit writes a few records whatever the state holds."""
    from featurestore.keys import Family

    pipe = open_pipeline(tmp_path / "p", 0, PipelineConfig())
    half = len(events) // 2
    pipe.process(events[:half])
    pipe.commit()
    held = pipe.core.counters()
    _seq, changes = pipe.prepare()  # the next batch: nothing yet
    state = [(k, v) for k, v in changes if k[0] == Family.JOIN_STATE]
    assert len(state) == 1  # the header only
    pipe.commit_prepared()
    pipe.process(events[half:half + 20])
    _seq, changes = pipe.prepare()
    state = [(k, v) for k, v in changes if k[0] == Family.JOIN_STATE]
    assert held["pending"] + held["retained"] > 300 and 1 < len(state) <= 1 + 3 * 20 + 200
    assert sum(len(v or b"") for _k, v in state) < len(pipe.core.to_bytes()) / 10
    pipe.commit_prepared()
    pipe.close()


def test_a_store_holding_the_join_core_as_one_blob_is_read_and_rewritten_as_records(events, tmp_path):
    """Stores written before the per-record layout keep the whole core under meta ``joiner.core``:
    it is restored from there, rewritten as records at the next commit and the blob deleted."""
    from featurestore import keys as fs_keys
    from streams.joiner.pipeline import CORE_META

    cfg = PipelineConfig()
    ref_pipe = open_pipeline(tmp_path / "ref", 0, cfg)
    ref = run_all(ref_pipe, events, 500)
    ref_pipe.close()
    path, half = tmp_path / "legacy", (len(events) // 1000) * 500
    pipe, got = open_pipeline(path, 0, cfg), []
    for i in range(0, half, 500):
        got += pipe.process(events[i:i + 500]).samples
        pipe.commit({"all": i + 500})
    blob = pipe.core.to_bytes()
    tx = pipe.store.transaction()  # the old layout: the blob, no records
    for key, _value in list(pipe.store._scan(fs_keys.family_prefix(fs_keys.Family.JOIN_STATE))):
        tx.put_raw(key, None)
    tx.put_raw(fs_keys.meta_key(CORE_META), blob)
    tx.commit()
    pipe.close()
    pipe = open_pipeline(path, 0, cfg)
    assert pipe.core.to_bytes() == blob
    got += run_all(pipe, events[half:], 500)
    assert pipe.meta(CORE_META) is None
    assert any(True for _ in pipe.store._scan(fs_keys.family_prefix(fs_keys.Family.JOIN_STATE)))
    pipe.close()
    assert got == ref


def test_changelog_markers_older_layout_and_malformed():
    """A marker completes its writer's batches up to its commit number; an older changelog's
    per-batch markers (key 0xFF | tag, empty value) still complete their batch alone; a marker
    whose key and value name different writers is rejected."""
    from streams.joiner.changelog import ChangelogIndex, ChangelogReplay, make_tag, marker_key

    log = [(b"a", b"1", make_tag(5, 1)), (b"b", b"1", make_tag(5, 2)), (marker_key(5), make_tag(5, 2), None),
           (b"c", b"1", make_tag(5, 3)),  # writer 5 died here
           (b"d", b"1", make_tag(6, 1)), (b"\xff" + make_tag(6, 1), b"", make_tag(6, 1)),  # older layout
           (b"e", b"1", make_tag(6, 2)), (b"c", b"2", make_tag(7, 1))]  # writer 7: no marker yet
    index = ChangelogIndex()
    for k, v, t in log:
        index.add(k, v, t)
    replay = ChangelogReplay(index)
    for k, v, t in log:
        replay.add(k, v, t)
    assert replay.take() == [(b"a", b"1"), (b"b", b"1"), (b"d", b"1")]
    assert replay.unfinished == {b"c", b"e"} and replay.n_skipped == 3 and replay.n_commits == 3
    with pytest.raises(ValueError, match="names writer"):
        ChangelogIndex().add(marker_key(5), make_tag(6, 1), None)
    with pytest.raises(ValueError, match="malformed"):
        ChangelogIndex().add(b"\xff\x00", b"", None)


@pytest.mark.parametrize("lateness_is_grace", [False, True], ids=["lateness", "lateness_is_grace"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_shuffled_and_duplicated_delivery_within_lateness_gives_the_same_encoded_samples(lateness_is_grace, data):
    """The whole pipeline, not only the join core: deliveries delayed by at most the allowed
    lateness (duplicates included), cut into any batches, give the same sample bytes (snapshot
    sequences, T1/T2/T3 rules, weights), late events and orphans as the in-order stream. Small
    windows, epochs and T2 look-back so that the draws cross them."""
    import tempfile

    jcfg = dataclasses.replace(GRACE if lateness_is_grace else CFG, seq_len=3)
    cfg = PipelineConfig(joiner=jcfg, stats_epoch_ms=5_000, t2_window_ms=20_000)
    events, arrivals = data.draw(deliveries(jcfg))
    chunk = data.draw(st.integers(1, 9))

    def run(evs, step=None):
        with tempfile.TemporaryDirectory() as tmp:
            return process_all(Path(tmp) / "s", evs, cfg, batch=step)

    base, base_n = run(events)
    got, n = run(arrivals, chunk)
    assert got.samples == base.samples and got.keys == base.keys and got.headers == base.headers
    assert len(got.samples) == len({e.impression_id for e in events if type(e) is Impression})
    assert sorted(x.event.event_id for x in got.late) == sorted(x.event.event_id for x in base.late)
    assert (sorted((x.event.event_id, x.reason) for x in got.orphans)
            == sorted((x.event.event_id, x.reason) for x in base.orphans))
    assert n["duplicate"] - base_n["duplicate"] == len(arrivals) - len(events)
    for s in map(decode, got.samples):
        assert snapshot_is_point_in_time(s)


def test_runtime_does_not_open_a_partition_no_longer_assigned(tmp_path):
    """The timer positions newly assigned partitions one after another, and opening one can take
    seconds; a partition moved away meanwhile is neither opened (its store lock stays free for its
    new owner) nor sought (position answers None)."""
    import asyncio

    from streams.joiner.app import JoinerAppConfig, JoinerRuntime

    assigned = {0, 1}

    async def main():
        rt = JoinerRuntime(JoinerAppConfig(data_dir=tmp_path, changelog=False, pipeline=PipelineConfig()),
                           send=None, read_back=lambda *a: [], caught_up=lambda *a: True,
                           assigned=lambda p: p in assigned)
        try:
            first = await rt.position(0)
            assigned.discard(1)  # a rebalance began while partition 0 was opened
            second = await rt.position(1)
            again = await rt.position(0)  # still held here: answered from the open partition
            return first, second, again, sorted(rt.partitions)
        finally:
            rt.close()
    first, second, again, held = asyncio.run(main())
    assert first == again == {"impressions": 0, "clicks": 0, "dwell": 0, "feedback": 0}
    assert second is None and held == [0]
    from streams.joiner.worker import store_path
    assert store_path(tmp_path, 0).exists() and not store_path(tmp_path, 1).exists()


class _MemChangelog:
    """An in-memory changelog partition with real offsets, read by ``read_changelog`` as it reads a
    ``PartitionReader`` (``partition()`` -> ``end_offset()``, ``records()``)."""

    def __init__(self) -> None:
        self.log: list[tuple[int, bytes, bytes | None, bytes]] = []  # (offset, key, value, tag)
        self.end = 0

    def append(self, key, value, tag) -> int:
        self.log.append((self.end, key, value, tag))
        self.end += 1
        return self.end - 1

    def compact(self) -> None:
        """What Kafka's compaction may leave: the last record of each key, no tombstones (their
        delete retention passed); offsets and the end unchanged."""
        self.log = _compact(self.log, key=1, value=2)

    @contextlib.contextmanager
    def partition(self, topic, partition):
        yield self

    def end_offset(self) -> int:
        return self.end

    def records(self, start, end, timeout_s, max_records=5000):
        from streams.joiner.changelog import HEADER_TAG
        recs = [SimpleNamespace(offset=o, key=k, value=v, headers=[(HEADER_TAG, t)])
                for o, k, v, t in self.log if start <= o < end]
        for i in range(0, len(recs), 7):  # a few records per poll
            yield recs[i:i + 7]


def test_a_store_behind_a_compacted_changelog_is_rebuilt_not_brought_forward(events, tmp_path):
    """Host A's store stops at changelog offset X; the partition then runs elsewhere (host B,
    without A's store), which deletes join-state records, and compaction drops superseded records
    and the tombstones. A opening its old store must not replay from X (a key B deleted would live
    on, and an emitted impression be emitted again): the hole in the offsets past X shows that
    compaction ran, and A rebuilds its store from offset 0. Its state then equals B's."""
    import asyncio

    from streams.joiner.app import JoinerAppConfig, JoinerRuntime
    from streams.joiner.changelog import HEADER_TAG, TOPIC_STORE_CHANGELOG, read_changelog
    from tests.streams.runtime_fakes import acked, consumed

    msgs = consumed(events)
    log = _MemChangelog()

    async def send(topic, key, value, partition, headers):
        if topic == TOPIC_STORE_CHANGELOG:
            return acked(log.append(key, value, dict(headers)[HEADER_TAG]))
        return acked(0)

    def runtime(data_dir):
        return JoinerRuntime(JoinerAppConfig(data_dir=data_dir, pipeline=PipelineConfig()), send=send,
                             read_back=lambda topic, p, start: [], caught_up=lambda *a: True,
                             restore=lambda p, start, apply: read_changelog(log, p, start, apply))

    rebuilds = {}  # data dir -> the counter at the end of its last life

    async def life(data_dir, chunk):
        rt = runtime(data_dir)
        await rt.position(0)
        for i in range(0, len(chunk), 1000):
            await rt.handle(chunk[i:i + 1000])
        items = _store_items(rt.partitions[0].pipeline)
        rebuilds[data_dir.name] = rt.counters().get("changelog_compacted_rebuilds", 0)
        rt.close()
        return items

    third = len(msgs) // 3
    asyncio.run(life(tmp_path / "a", msgs[:third]))               # host A, up to X
    x = log.end
    b_items = asyncio.run(life(tmp_path / "b", msgs[third:2 * third]))  # host B: restores from 0, goes on
    deleted = {k for o, k, v, _t in log.log if o >= x and v is None}
    assert deleted  # B deleted keys (join state of impressions it emitted)
    log.compact()
    assert 0 < len([o for o, *_ in log.log if o >= x]) < log.end - x  # holes past X

    # what replaying the compacted range onto A's old store would give: B's deletes are missing
    shutil.copytree(tmp_path / "a", tmp_path / "a-naive")
    naive = RocksFeatureStore(next((tmp_path / "a-naive").rglob("p0000")), PipelineConfig().store)
    naive.apply_changes([(k, v) for o, k, v, _t in log.log if o >= x])
    naive_items = _store_items(naive)
    naive.close()
    assert naive_items != b_items and set(naive_items) & deleted

    a_items = asyncio.run(life(tmp_path / "a", []))               # host A again: rebuilt from 0
    assert a_items == b_items
    assert rebuilds == {"a": 1, "b": 0}  # counted

