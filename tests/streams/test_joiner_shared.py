"""Shared statistics (``streams.joiner.shared``): the ``joiner.dwell`` messages, the table's
de-duplication of re-publications, and the pipeline's use of what has arrived."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streams.contracts import Impression
from streams.joiner.pipeline import PipelineConfig, open_pipeline
from featurestore import DwellStats, RocksFeatureStore
from streams.joiner.shared import (CONTRIB, HEADER_STATS, RemoteStats, SharedStatsError, SharedStatsView,
                                   StatsPublisher, decode_message, encode_message)
from streams.joiner.worker import build_samples, partition_for, shared_contributions
from streams.replay import iter_events
from streams.samples import decode
from streams.samples_file import read_samples
from tests.streams.test_joiner_pipeline import process_all

REPO_ROOT = Path(__file__).resolve().parents[2]
SLICE = REPO_ROOT / "data" / "kuairand-slice" / "log_standard_slice.csv.gz"


@pytest.fixture(scope="module")
def events():
    evs = list(iter_events([SLICE]))
    return [e for e in evs if e.ts_ms < evs[0].ts_ms + 6 * 3_600_000]


def test_message_round_trip_and_bad_messages():
    recs = np.array([(3, 7, 9000, 100), (4, 8, 12000, 200)], dtype=CONTRIB)
    source, lo, hi, back = decode_message(encode_message(2, 3, 5, recs))
    assert (source, lo, hi) == (2, 3, 5) and back.tolist() == recs.tolist()
    for bad in (b"", b"XXXX" + bytes(40), encode_message(2, 3, 5, recs)[:-1]):
        with pytest.raises(SharedStatsError):
            decode_message(bad)


def test_republication_after_a_restart_is_applied_once():
    """A restarted source publishes again from its last committed epoch, cut differently."""
    a = StatsPublisher(1, epoch_ms=10)
    for epoch in range(6):
        a.add(epoch, item_id=epoch, dwell_ms=1000 + epoch, click_ts_ms=epoch * 10)
    first = [a.publish(29), a.publish(59)]  # epochs [0, 3), [3, 6)
    b = StatsPublisher(1, epoch_ms=10)  # the restart: nothing was committed
    for epoch in range(6):
        b.add(epoch, item_id=epoch, dwell_ms=1000 + epoch, click_ts_ms=epoch * 10)
    again = [b.publish(19), b.publish(49), b.publish(59)]  # [0, 2), [2, 5), [5, 6)
    table = RemoteStats(2)
    assert [table.add(m) for m in first[:1] + again] == [True, False, True, True]
    assert table.complete_before(1) == 6 and table.complete_before(0) < 0
    assert table.take(1, 0, 6)["epoch"].tolist() == [0, 1, 2, 3, 4, 5]
    assert table.take(1, 2, 4)["item_id"].tolist() == [2, 3]


def test_a_message_past_a_gap_waits_for_the_ones_before_it():
    """A partition's new owner publishes straight into its table while the previous owner's last
    messages may still be in the feed: the epochs between are not complete until they arrive."""
    table, pub = RemoteStats(2), StatsPublisher(1, epoch_ms=10)
    for epoch in range(6):
        pub.add(epoch, item_id=epoch, dwell_ms=1000 + epoch, click_ts_ms=epoch * 10)
    m02, m23, m35, m56 = pub.publish(19), pub.publish(29), pub.publish(49), pub.publish(59)
    assert table.add(m02) and table.complete_before(1) == 2
    assert table.add(m35, local=True) and table.add(m56, local=True) and table.n_held == 2
    assert table.complete_before(1) == 2 and table.take(1, 0, 6)["epoch"].tolist() == [0, 1]
    assert table.add(m23)  # the gap is filled: the held messages follow, in order
    assert table.complete_before(1) == 6 and table.take(1, 0, 6)["epoch"].tolist() == [0, 1, 2, 3, 4, 5]
    assert [table.add(m) for m in (m35, m56)] == [False, False]  # the feed's copies: seen
    # after a reset the first message is taken wherever it starts (retention may have removed the
    # ones before it)
    assert table.first_epoch(1) == 0 and table.first_epoch(0) < 0
    table.reset()
    assert table.add(m35) and table.complete_before(1) == 5 and table.take(1, 0, 6)["epoch"].tolist() == [3, 4]
    assert table.first_epoch(1) == 3  # a reader needing epochs 0..2 can tell they are gone


def test_a_topic_message_past_a_gap_is_taken_and_the_gap_recorded(tmp_path):
    """A source's messages are contiguous in its partition: one read from the topic that starts
    past what the table has means records the feed will never see (retention removed them while
    it read). It is taken, not held for good, and the epochs skipped are reported as missing."""
    table, pub = RemoteStats(2), StatsPublisher(1, epoch_ms=10)
    for epoch in range(6):
        pub.add(epoch, item_id=epoch, dwell_ms=1000 + epoch, click_ts_ms=epoch * 10)
    m02, _m23, m35, m56 = pub.publish(19), pub.publish(29), pub.publish(49), pub.publish(59)
    assert table.add(m02) and table.add(m35) and table.add(m56)
    assert table.n_held == 0 and table.n_gaps == 1 and table.complete_before(1) == 6
    assert table.take(1, 0, 6)["epoch"].tolist() == [0, 1, 3, 4, 5]
    assert table.missing(1, 0, 6) == [(2, 3)] and table.missing(1, 3, 6) == []
    # a partition that needs them is told, once
    partials = {}
    counters: dict[str, int] = {}
    view = SharedStatsView(0, table, 10, partials, counters)
    with RocksFeatureStore(tmp_path / "store") as store:
        tx = store.transaction()
        view.freeze(tx, 4, DwellStats.from_config(store.config.dwell))
        view.freeze(tx, 5, DwellStats.from_config(store.config.dwell))
        tx.abort()
    assert counters["stats_remote_gaps"] == 1 and view.applied[1] == 5


def test_bad_messages_are_refused_with_a_reason():
    """What the feed counts as bad instead of crashing on: a null value (a tombstone on the topic),
    records outside the message's epochs, a source that is not the partition read from."""
    pub = StatsPublisher(1, epoch_ms=10)
    pub.add(0, item_id=1, dwell_ms=1000, click_ts_ms=1)
    m01 = pub.publish(9)
    table = RemoteStats(2)
    with pytest.raises(SharedStatsError, match="null"):
        table.add(None)
    source, lo, hi, recs = decode_message(m01)
    with pytest.raises(SharedStatsError, match="within"):
        table.add(encode_message(source, 1, 2, recs))
    with pytest.raises(SharedStatsError, match="partition 0"):
        table.add(m01, partition=0)
    assert table.add(m01, partition=1) and table.complete_before(1) == 1


def test_a_reread_does_not_bring_back_pruned_epochs():
    """After a reset, epochs below what was pruned are not kept again when the feed re-reads them:
    no partition here needs them (pruning follows the committed needs)."""
    pub = StatsPublisher(1, epoch_ms=10)
    for epoch in range(6):
        pub.add(epoch, item_id=epoch, dwell_ms=1000 + epoch, click_ts_ms=epoch * 10)
    m06 = pub.publish(59)
    table = RemoteStats(2)
    table.reset()
    assert table.prune(1, 4) == 0  # before the re-read has brought anything
    assert table.add(m06) and table.complete_before(1) == 6
    assert table.take(1, 4, 6)["epoch"].tolist() == [4, 5] and table.n_records == 2


def test_offline_shared_statistics_equal_those_of_one_partition(events, tmp_path):
    """With every contribution of earlier epochs (the offline builder), three partitions judge T1/T3
    exactly as one partition does; per-partition statistics do not."""
    cfg = PipelineConfig()
    build_samples(events, tmp_path / "one.bin", tmp_path / "w1", cfg)
    build_samples(lambda: iter(events), tmp_path / "three.bin", tmp_path / "w3", cfg, n_partitions=3)
    build_samples(events, tmp_path / "local.bin", tmp_path / "wl", PipelineConfig(shared_stats=False), n_partitions=3)
    one, three, local = ({s.impression_id: s for s in map(decode, read_samples(tmp_path / f"{n}.bin"))}
                         for n in ("one", "three", "local"))
    assert one.keys() == three.keys() == local.keys()
    assert all(one[k].rules == three[k].rules and one[k].flags == three[k].flags for k in one)
    assert sum(one[k].rules != local[k].rules for k in one) > 100


def test_pipeline_uses_what_has_arrived_and_marks_incomplete_samples(events, tmp_path):
    """Partition 0 of two: with nothing from partition 1 it labels as with per-partition statistics
    and marks its clicked samples; with all of partition 1's contributions it labels as the
    offline builder does."""
    cfg = PipelineConfig()
    mine = [e for e in events if partition_for(e.user_id, 2) == 0]
    complete = shared_contributions(events, cfg, 2)

    def run(name, remote, config=cfg):
        return process_all(tmp_path / name, mine, config, remote)

    empty, c_empty = run("empty", RemoteStats(2))
    local, _ = run("local", None, PipelineConfig(shared_stats=False))
    full, c_full = run("full", complete)
    assert empty.samples == local.samples
    clicked = [decode(v).clicked for v in empty.samples]
    assert [h is not None for h in empty.headers] == clicked
    assert all(h == [(HEADER_STATS, h[0][1])] and h[0][1].endswith(b",0") for h in empty.headers if h)
    assert c_empty["stats_samples_incomplete"] == sum(clicked) and c_empty["stats_remote_applied"] == 0
    assert c_full.get("stats_samples_incomplete", 0) == 0 and c_full["stats_remote_applied"] > 0
    assert c_full.get("stats_remote_gaps", 0) == 0 and c_empty.get("stats_remote_gaps", 0) == 0
    assert full.headers == [None] * len(full.samples) and full.samples != local.samples
    assert len(full.stats) == 2 and sum(type(e) is Impression for e in mine) == len(full.samples)
    build_samples(events, tmp_path / "two.bin", tmp_path / "w2", cfg, n_partitions=2)
    offline = {decode(v).impression_id: v for v in read_samples(tmp_path / "two.bin")}
    assert all(offline[decode(v).impression_id] == v for v in full.samples)


def test_epochs_gone_from_the_topic_are_counted_and_logged_not_silently_skipped(events, tmp_path, caplog):
    """joiner.dwell read after its retention removed source 1's first messages: partition 0 needs
    those epochs; it labels with what is there, counts the gap and says which epochs are missing."""
    cfg = PipelineConfig()
    mine = [e for e in events if partition_for(e.user_id, 2) == 0]
    complete = shared_contributions(events, cfg, 2)
    recs = complete.take(1, 0, 2**62)
    epochs = np.unique(recs["epoch"])
    k, end = int(epochs[len(epochs) // 2]), int(epochs[-1]) + 1
    trimmed = RemoteStats(2)
    assert trimmed.add(encode_message(1, k, end, recs[recs["epoch"] >= k])) and trimmed.first_epoch(1) == k

    def run(name, remote):
        return process_all(tmp_path / name, mine, cfg, remote)

    caplog.set_level("WARNING", logger="streams.joiner.shared")
    cut, c_cut = run("trimmed", trimmed)
    assert c_cut["stats_remote_gaps"] == 1  # once, not once per epoch labelled before k
    [msg] = [r.getMessage() for r in caplog.records if "stats_epochs_missing" in r.getMessage()]
    assert f"partition=0 source=1 epochs=[0, {k})" in msg
    full, c_full = run("full", complete)
    assert c_full.get("stats_remote_gaps", 0) == 0 and len(cut.samples) == len(full.samples)
    # everything else was applied: the difference is exactly the missing epochs' contributions
    assert c_full["stats_remote_applied"] - c_cut["stats_remote_applied"] == int((recs["epoch"] < k).sum()) > 0


def _table_with_epochs(n_epochs: int, source: int = 1) -> tuple[RemoteStats, list[bytes]]:
    pub = StatsPublisher(source, epoch_ms=10)
    for epoch in range(n_epochs):
        pub.add(epoch, item_id=epoch, dwell_ms=1000 + epoch, click_ts_ms=epoch * 10)
    msgs = [pub.publish(10 * e + 9) for e in range(n_epochs)]
    table = RemoteStats(2)
    for m in msgs:
        table.add(m)
    return table, msgs


def test_a_pruned_table_refuses_pruned_epochs_until_reset():
    table, msgs = _table_with_epochs(6)
    assert table.prune(1, 3) == 3 and table.prune(1, 2) == 0 and table.n_pruned == 3
    assert table.pruned_before(1) == 3 and table.pruned_before(0) < 0
    assert table.take(1, 3, 6)["epoch"].tolist() == [3, 4, 5]
    with pytest.raises(SharedStatsError, match="pruned"):
        table.take(1, 2, 6)
    table.reset()
    assert table.complete_before(1) < 0 and table.pruned_before(1) < 0
    assert [table.add(m) for m in msgs] == [True] * 6
    assert table.take(1, 0, 6)["epoch"].tolist() == list(range(6))


def test_pipeline_reports_what_its_committed_state_needs(events, tmp_path):
    """The pruning bound follows commits only: what was applied but not committed may be redone."""
    cfg = PipelineConfig()
    mine = [e for e in events if partition_for(e.user_id, 2) == 0]
    remote = shared_contributions(events, cfg, 2)
    pipe = open_pipeline(tmp_path / "p0", 0, cfg, remote)
    assert pipe.shared_needs_committed == {1: 0}
    half = len(mine) // 2
    pipe.process(mine[:half])
    pipe.commit()
    committed = pipe.shared_needs_committed
    assert committed[1] > 0
    pipe.process(mine[half:])
    assert pipe.shared_needs_committed == committed  # applied more, committed nothing
    pipe.close()
    reopened = open_pipeline(tmp_path / "p0", 0, cfg, remote)
    assert reopened.shared_needs_committed == committed
    reopened.close()


def test_stats_feed_rewind_reads_the_topic_again(broker):
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    from streams.joiner.shared import TOPIC_DWELL_STATS
    from streams.joiner.statsfeed import StatsFeed

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(TOPIC_DWELL_STATS, num_partitions=2, replication_factor=1)])
    admin.close()
    _, msgs = _table_with_epochs(6)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for m in msgs:
        producer.send(TOPIC_DWELL_STATS, key=b"1", value=m, partition=1)
    producer.flush()
    producer.close()
    feed = StatsFeed(broker.bootstrap).start()
    try:
        assert feed.wait_caught_up(30)
        assert feed.table.complete_before(1) == 6
        assert feed.table.prune(1, 4) == 4
        ticket = feed.rewind()
        assert feed.wait_rewound(ticket, 30)
        assert feed.table.take(1, 0, 6)["epoch"].tolist() == list(range(6))
        assert feed.counters()["stats_feed_rewinds"] == 1 and feed.counters()["stats_feed_pruned"] == 4
    finally:
        feed.stop()


def test_runtime_prunes_what_its_partitions_committed_and_rereads_for_a_newcomer(events, tmp_path, monkeypatch):
    """Partition 0 is held and has committed; the table is pruned to what it still needs (all of
    partition 0's own contributions: no other held partition needs them). Partition 1, whose
    committed state needs older epochs of partition 0, is then assigned: the worker reads the
    table again before opening it, and it labels the rest of its events."""
    import asyncio

    from streams.joiner.app import JoinerAppConfig, JoinerRuntime
    from streams.joiner.worker import store_path

    cfg = PipelineConfig()
    msgs: list[bytes] = []
    add = RemoteStats.add
    monkeypatch.setattr(RemoteStats, "add", lambda self, value: (msgs.append(value), add(self, value))[1])
    remote = shared_contributions(events, cfg, 2)
    monkeypatch.undo()
    by_p = {p: [e for e in events if partition_for(e.user_id, 2) == p] for p in (0, 1)}
    pipe1 = open_pipeline(store_path(tmp_path, 1), 1, cfg, remote)  # a store a moved partition brings along
    pipe1.process(by_p[1][:len(by_p[1]) // 3])
    pipe1.commit()
    needs1 = pipe1.shared_needs_committed[0]
    pipe1.close()

    rereads = []

    async def reread():
        rereads.append(len(msgs))
        remote.reset()
        for m in msgs:
            remote.add(m)
        remote.seal()

    async def scenario():
        rt = JoinerRuntime(JoinerAppConfig(data_dir=tmp_path, changelog=False, pipeline=cfg), send=None,
                           read_back=lambda topic, p, start: [], caught_up=lambda *a: True, remote=remote,
                           reread=reread)
        try:
            await rt.position(0)
            pipe0 = rt.partitions[0].pipeline
            pipe0.process(by_p[0])
            pipe0.commit()
            rt._prune_remote()
            assert remote.pruned_before(1) == pipe0.shared_needs_committed[1] > 0
            assert remote.pruned_before(0) > needs1 and remote.n_pruned > 0 and not rereads
            await rt.position(1)
            assert rereads and remote.pruned_before(0) < 0
            out = rt.partitions[1].pipeline.process(by_p[1][len(by_p[1]) // 3:])
            assert out.samples
        finally:
            rt.close()

    asyncio.run(scenario())


def test_stats_feed_after_retention_knows_where_its_table_starts(broker):
    """Retention removed joiner.dwell's oldest segments: the feed's table starts at the first
    message left, and says so (first_epoch), so a partition needing older epochs reports the gap."""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewTopic

    from streams.joiner.shared import TOPIC_DWELL_STATS
    from streams.joiner.statsfeed import StatsFeed

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    admin.create_topics([NewTopic(TOPIC_DWELL_STATS, num_partitions=2, replication_factor=1,
                                  topic_configs={"segment.bytes": "1024", "retention.bytes": "1024"})])
    admin.close()
    _, msgs = _table_with_epochs(40)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=0)
    for m in msgs:  # one batch each
        producer.send(TOPIC_DWELL_STATS, key=b"1", value=m, partition=1).get(10)
    producer.close()
    assert broker.enforce_retention() > 0
    feed = StatsFeed(broker.bootstrap).start()
    try:
        assert feed.wait_caught_up(30)
        first = feed.table.first_epoch(1)
        assert 0 < first < 39 and feed.table.complete_before(1) == 40
        assert feed.table.take(1, 0, 40)["epoch"].tolist() == list(range(first, 40))
    finally:
        feed.stop()


def test_a_local_message_waits_for_the_feed_to_bring_its_source_first():
    """A restarted partition's first publication reaches its worker's table before a slow feed
    has read the source's older messages: taken as the source's first, it would make those epochs
    look gone (the feed's copies then ignored as seen). It is held until the feed's first
    message of the source arrives; a local message starting at epoch 0 is taken at once."""
    pub = StatsPublisher(1, epoch_ms=10)
    for epoch in range(6):
        pub.add(epoch, item_id=epoch, dwell_ms=1000 + epoch, click_ts_ms=epoch * 10)
    m02, m24, m46 = pub.publish(19), pub.publish(39), pub.publish(59)
    table = RemoteStats(2)
    assert table.add(m46, local=True) and table.n_held == 1
    assert table.complete_before(1) < 0 and table.first_epoch(1) < 0
    assert table.add(m02) and table.first_epoch(1) == 0 and table.complete_before(1) == 2
    assert table.add(m24) and table.complete_before(1) == 6  # the held local message follows
    assert table.take(1, 0, 6)["epoch"].tolist() == [0, 1, 2, 3, 4, 5]
    assert not table.add(m46)  # the feed's copy of the local message: seen
    fresh = RemoteStats(2)
    assert fresh.add(m02, local=True) and fresh.complete_before(1) == 2 and fresh.n_held == 0
    # the feed starts with the source's first message left in the topic: taken wherever it starts
    trimmed = RemoteStats(2)
    assert trimmed.add(m46, local=True) and trimmed.add(m46) and trimmed.first_epoch(1) == 4
    assert trimmed.complete_before(1) == 6 and trimmed.n_held == 1


def test_runtime_publications_do_not_start_the_table_before_the_feed(events, tmp_path):
    """Worker startup with a feed that has read nothing yet (``stats_feed_slow``): partition 0,
    restarted from its store, publishes epochs past 0 straight into the worker's table. They wait
    there for the feed, and once the feed has brought the messages of the first life the table
    holds every epoch of source 0, exactly as a table that read the whole topic."""
    import asyncio

    from streams.joiner.app import JoinerAppConfig, JoinerRuntime
    from streams.joiner.shared import TOPIC_DWELL_STATS
    from tests.streams.runtime_fakes import acked, consumed

    cfg = PipelineConfig()
    msgs = consumed([e for e in events if partition_for(e.user_id, 2) == 0])
    published: list[bytes] = []  # joiner.dwell in topic order
    n_out = [0]

    async def send(topic, key, value, partition, headers):
        if topic == TOPIC_DWELL_STATS:
            published.append(value)
        n_out[0] += 1
        return acked(n_out[0] - 1)

    async def life(remote: RemoteStats, batch: list) -> int:
        rt = JoinerRuntime(JoinerAppConfig(data_dir=tmp_path, changelog=False, pipeline=cfg), send=send,
                           read_back=lambda topic, p, start: [], caught_up=lambda *a: True, remote=remote)
        try:
            await rt.position(0)
            for i in range(0, len(batch), 2000):
                await rt.handle(batch[i:i + 2000])
            return len(published)
        finally:
            rt.close()

    half = len(msgs) // 2
    n_first = asyncio.run(life(RemoteStats(2), msgs[:half]))
    restarted = RemoteStats(2)  # the second life's table: its feed has read nothing yet
    asyncio.run(life(restarted, msgs[half:]))
    assert n_first > 0 and len(published) > n_first
    assert decode_message(published[n_first])[1] > 0  # the restart publishes from past epoch 0
    assert restarted.complete_before(0) < 0 and restarted.first_epoch(0) < 0 and restarted.n_held > 0
    whole = RemoteStats(2)
    for m in published:
        whole.add(m)
        restarted.add(m)  # the feed catches up
    end = whole.complete_before(0)
    assert restarted.first_epoch(0) == 0 and restarted.complete_before(0) == end > 0
    assert restarted.take(0, 0, end).tolist() == whole.take(0, 0, end).tolist()
    assert len(whole.take(0, 0, end)) > 0
