"""Shared statistics (``streams.joiner.shared``): the ``joiner.dwell`` messages, the table's
de-duplication of re-publications, and the pipeline's use of what has arrived."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streams.contracts import Impression
from streams.joiner.pipeline import PipelineConfig, open_pipeline
from streams.joiner.shared import (CONTRIB, HEADER_STATS, RemoteStats, SharedStatsError, StatsPublisher,
                                   decode_message, encode_message)
from streams.joiner.worker import build_samples, partition_for, shared_contributions
from streams.replay import iter_events
from streams.samples import decode
from streams.samples_file import read_samples

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
        pipe = open_pipeline(tmp_path / name, 0, config, remote)
        out = pipe.process(mine)
        out.extend(pipe.finish())
        pipe.commit()
        counters = pipe.counters()
        pipe.close()
        return out, counters

    empty, c_empty = run("empty", RemoteStats(2))
    local, _ = run("local", None, PipelineConfig(shared_stats=False))
    full, c_full = run("full", complete)
    assert empty.samples == local.samples
    clicked = [decode(v).clicked for v in empty.samples]
    assert [h is not None for h in empty.headers] == clicked
    assert all(h == [(HEADER_STATS, h[0][1])] and h[0][1].endswith(b",0") for h in empty.headers if h)
    assert c_empty["stats_samples_incomplete"] == sum(clicked) and c_empty["stats_remote_applied"] == 0
    assert c_full.get("stats_samples_incomplete", 0) == 0 and c_full["stats_remote_applied"] > 0
    assert full.headers == [None] * len(full.samples) and full.samples != local.samples
    assert len(full.stats) == 2 and sum(type(e) is Impression for e in mine) == len(full.samples)
    build_samples(events, tmp_path / "two.bin", tmp_path / "w2", cfg, n_partitions=2)
    offline = {decode(v).impression_id: v for v in read_samples(tmp_path / "two.bin")}
    assert all(offline[decode(v).impression_id] == v for v in full.samples)
