"""Offline builder over the bundled slice: one sample per impression, valid-read decisions against a
plain computation from the events, point-in-time snapshots rebuilt from the events, batching and
partitioning invariance, the samples-file framing."""
from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from streamrec.commands import build_samples as build_samples_cmd
from streams.contracts import Click, Dwell, Feedback, FeedbackKind, Impression
from streams.joiner import RULE_T1, RULE_T2, RULE_T3, JoinerConfig
from streams.joiner.pipeline import PipelineConfig
from streams.joiner.worker import build_samples
from streams.replay import iter_events
from streams.samples import decode, snapshot_is_point_in_time
from streams.samples_file import SamplesFileError, read_sample_batches, read_samples, write_samples

REPO_ROOT = Path(__file__).resolve().parents[2]
SLICE = REPO_ROOT / "data" / "kuairand-slice" / "log_standard_slice.csv.gz"
N_IMPRESSIONS = 16_857
DAY_MS = 86_400_000


@pytest.fixture(scope="module")
def slice_events():
    return list(iter_events([SLICE]))


@pytest.fixture(scope="module")
def built(slice_events, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    summary = build_samples(slice_events, tmp / "samples.bin", tmp / "work", PipelineConfig())
    return summary, list(read_samples(tmp / "samples.bin"))


def test_one_sample_per_impression(slice_events, built):
    summary, values = built
    imps = [e for e in slice_events if type(e) is Impression]
    assert len(imps) == N_IMPRESSIONS
    samples = [decode(v) for v in values]
    ids = [s.impression_id for s in samples]
    assert len(ids) == len(set(ids)) == N_IMPRESSIONS
    assert set(ids) == {i.impression_id for i in imps}
    c = summary.counters
    assert (c["samples"], c["late"], c["orphan"], c["pending"], c["buffered"]) == (N_IMPRESSIONS, 0, 0, 0, 0)
    assert summary.n_events == len(slice_events)


def plain_outcomes(events):
    """impression_id -> (impression, first click ts or None, dwell or -1, first like ts or None,
    first dislike ts or None), from the events."""
    imps, clicks, dwell, likes, dislikes = {}, {}, {}, {}, {}
    for e in events:
        k = e.impression_id
        if type(e) is Impression:
            imps[k] = e
        elif type(e) is Click:
            clicks[k] = min(clicks.get(k, e.ts_ms), e.ts_ms)
        elif type(e) is Dwell:
            if k not in dwell or (e.ts_ms, e.event_id) > dwell[k][0]:
                dwell[k] = ((e.ts_ms, e.event_id), e.dwell_ms)
        elif type(e) is Feedback:
            first = likes if e.kind == FeedbackKind.LIKE else dislikes
            first[k] = min(first.get(k, e.ts_ms), e.ts_ms)
    return {k: (imp, clicks.get(k), dwell[k][1] if k in dwell else -1, likes.get(k), dislikes.get(k))
            for k, imp in imps.items()}


def test_valid_read_matches_plain_computation(slice_events, built):
    """T1: decayed mu/sigma of ln(dwell) over the clicks of samples closed in earlier minutes of label
    time; T2: the user's clicks (first click of each impression shown before the sample's close,
    whenever that impression closes) in [click - 7 d, click); T3: the item's P10 over earlier-minute
    dwell (exact: nearest rank); the 5 s floor."""
    cfg = PipelineConfig()
    vr, window, epoch_ms = cfg.joiner.valid_read, cfg.joiner.label_window_ms, cfg.stats_epoch_ms
    half_life = cfg.store.dwell.half_life_ms
    outcomes = plain_outcomes(slice_events)
    user_clicks = defaultdict(list)  # user -> [(click ts, impression ts)]
    for imp, click_ts, *_ in outcomes.values():
        if click_ts is not None:
            user_clicks[imp.user_id].append((click_ts, imp.ts_ms))
    user_clicks = {u: np.array(sorted(v), dtype=np.int64).reshape(-1, 2) for u, v in user_clicks.items()}
    order = sorted(outcomes, key=lambda k: (outcomes[k][0].ts_ms + window, k))  # close order
    expected = {}
    hist_t, hist_x, item_dwell = [], [], defaultdict(list)
    staged = []  # (click ts, ln dwell, item, dwell) of the current minute, applied when it ends
    current = None
    for k in order:
        imp, click_ts, dwell, _liked, _disliked = outcomes[k]
        epoch = (imp.ts_ms + window) // epoch_ms
        if epoch != current:
            for t, x, item, d in staged:
                hist_t.append(t)
                hist_x.append(x)
                item_dwell[item].append(d)
            staged, current = [], epoch
        if click_ts is None:
            expected[k] = (False, 0)
            continue
        rules = 0
        if hist_t:
            t = np.array(hist_t, dtype=np.float64)
            w = np.exp2((t - t.max()) / half_life)
            x = np.array(hist_x)
            mu = float((w * x).sum() / w.sum())
            sigma = math.sqrt(float((w * (x - mu) ** 2).sum() / w.sum()))
            x_l = math.exp(mu - sigma)
            if dwell >= 0 and dwell >= x_l:
                rules |= RULE_T1
        uc = user_clicks[imp.user_id]
        n7 = int(np.count_nonzero((uc[:, 0] >= click_ts - 7 * DAY_MS) & (uc[:, 0] < click_ts)
                                  & (uc[:, 1] < imp.ts_ms + window)))
        if n7 < vr.t2_max_clicks:
            rules |= RULE_T2
        hist = sorted(item_dwell[imp.item_id])
        unsure = False
        if hist and dwell >= 0:
            rank = lambda q: hist[max(math.ceil(q * len(hist)) - 1, 0)]  # noqa: E731
            if dwell >= rank(vr.t3_quantile):
                rules |= RULE_T3
            # past k = 200 values the sketch answers within its rank error (at most 1 %): a dwell that
            # close to the P10 may fall either way
            unsure = len(hist) >= 200 and rank(vr.t3_quantile - 0.02) <= dwell < rank(vr.t3_quantile + 0.02)
        valid = dwell >= vr.min_dwell_ms and rules != 0
        expected[k] = (valid, rules) if not unsure else None
        if dwell >= 0:
            staged.append((click_ts, math.log(max(dwell, 1)), imp.item_id, dwell))
    _summary, values = built
    got = {s.impression_id: (s.valid_read, s.rules & (RULE_T1 | RULE_T2 | RULE_T3)) for s in map(decode, values)}
    assert got.keys() == expected.keys()
    unsure = [k for k, v in expected.items() if v is None]
    assert len(unsure) < len(expected) // 100
    mismatched = [k for k in got if expected[k] is not None and got[k] != expected[k]]
    assert not mismatched, [(k, got[k], expected[k]) for k in mismatched[:5]]
    n_valid = sum(v[0] for v in expected.values() if v is not None)
    assert 0 < n_valid < sum(1 for o in outcomes.values() if o[1] is not None)  # the rules do cut


def check_snapshots(events, values, seq_len):
    """Each snapshot equals the user's last T entries strictly before the impression, rebuilt from the
    events with every entry at the time it became known: a click at the first click, an unclick at
    the close, a like / dislike at the first like / dislike (outcomes before the close only).
    Entries come from the impressions shown before the sample's close, whether they closed before
    it or not; at equal entry ts the ones closed before the sample come first (in close order), then
    the others by impression id. Never its own outcome. Returns (samples with a non-empty snapshot,
    entries of impressions that closed after the sample)."""
    outcomes = plain_outcomes(events)
    samples = list(map(decode, values))
    closes = {s.impression_id: s.label_ts_ms for s in samples}
    entries = defaultdict(lambda: defaultdict(list))  # user -> kind -> [(entry ts, close, id, item, cat, imp ts)]
    for k, (imp, click_ts, _dwell, like_ts, dislike_ts) in outcomes.items():
        close = closes[k]
        row = (close, k, imp.item_id, imp.item_category, imp.ts_ms)
        per = entries[imp.user_id]
        per["click" if click_ts is not None else "unclick"].append(
            (click_ts if click_ts is not None else close, *row))
        if like_ts is not None and like_ts < close:
            per["like"].append((like_ts, *row))
        if dislike_ts is not None and dislike_ts < close:
            per["dislike"].append((dislike_ts, *row))
    n_nonempty = n_unsettled = 0
    for s in samples:
        imp, click_ts, _dwell, like_ts, dislike_ts = outcomes[s.impression_id]
        me = (s.label_ts_ms, s.impression_id)

        def order(e):
            return (e[0], 0, e[1], e[2]) if (e[1], e[2]) < me else (e[0], 1, e[2], 0)

        times = []
        for kind in ("click", "unclick", "like", "dislike"):
            before = sorted((e for e in entries[s.user_id][kind] if e[0] < s.ts_ms and e[5] < s.label_ts_ms),
                            key=order)[-seq_len:]
            assert s.snapshot.sequence(kind) == (tuple(e[3] for e in before), tuple(e[4] for e in before)), \
                (s.impression_id, kind)
            times += [e[0] for e in before]
            assert s.impression_id not in {e[2] for e in before}
            n_unsettled += sum((e[1], e[2]) > me for e in before)
        own = [s.ts_ms] + [x for x in (click_ts, like_ts, dislike_ts) if x is not None]
        assert snapshot_is_point_in_time(s, entry_ts_ms=times, own_outcome_ts_ms=own)
        n_nonempty += bool(times)
    return n_nonempty, n_unsettled


def test_snapshots_are_point_in_time_and_complete(slice_events, built):
    _summary, values = built
    n_nonempty, _ = check_snapshots(slice_events, values, PipelineConfig().joiner.seq_len)
    assert n_nonempty > N_IMPRESSIONS // 3  # 7,750 in the slice


def test_early_emission_snapshots_include_outcomes_of_pending_impressions(slice_events, tmp_path):
    """With early emission a sample can close before earlier impressions of its user; their clicks
    and feedback before its ts are still in its snapshot, and no batch cut changes a sample."""
    cfg = PipelineConfig(joiner=JoinerConfig(emit_early_on_final_dwell=True))
    summary = build_samples(slice_events, tmp_path / "a.bin", tmp_path / "wa", cfg, batch_events=4096)
    build_samples(slice_events, tmp_path / "b.bin", tmp_path / "wb", cfg, batch_events=7)
    values = list(read_samples(tmp_path / "a.bin"))
    assert summary.counters["emitted_early"] > N_IMPRESSIONS // 3  # 7,476 in the slice
    assert sorted(values) == sorted(read_samples(tmp_path / "b.bin"))
    n_nonempty, n_unsettled = check_snapshots(slice_events, values, cfg.joiner.seq_len)
    assert n_nonempty > N_IMPRESSIONS // 3  # 7,097 in the slice
    assert n_unsettled > 0  # 5 in the slice: entries of impressions that closed after the sample


def test_batching_and_partitions_do_not_change_samples(slice_events, built, tmp_path):
    """Batch size never changes a sample; three partitions change only T1/T3 statistics
    (per-partition), never the join, the snapshot or T2."""
    _summary, values = built
    events = [e for e in slice_events if e.ts_ms < slice_events[0].ts_ms + 3 * 3_600_000]
    ref = build_samples(events, tmp_path / "a.bin", tmp_path / "wa", PipelineConfig(), batch_events=4096)
    small = build_samples(events, tmp_path / "b.bin", tmp_path / "wb", PipelineConfig(), batch_events=7)
    assert ref.n_samples > 1000 and small.n_samples == ref.n_samples
    assert sorted(read_samples(tmp_path / "a.bin")) == sorted(read_samples(tmp_path / "b.bin"))
    build_samples(events, tmp_path / "c.bin", tmp_path / "wc", PipelineConfig(), n_partitions=3, batch_events=100)
    one = {s.impression_id: s for s in map(decode, read_samples(tmp_path / "a.bin"))}
    three = {s.impression_id: s for s in map(decode, read_samples(tmp_path / "c.bin"))}
    assert one.keys() == three.keys()
    for k, s in one.items():
        o = three[k]
        assert (s.snapshot, s.clicked, s.dwell_ms, s.label_ts_ms, s.rules & RULE_T2) == \
            (o.snapshot, o.clicked, o.dwell_ms, o.label_ts_ms, o.rules & RULE_T2)


def test_cli_writes_the_file(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    build_samples_cmd.register(parser.add_subparsers())
    args = parser.parse_args(["build-samples", str(SLICE), "--out", str(tmp_path / "s.bin"),
                              "--until", "2022-04-24T16:00:00Z"])
    assert args.func(args) == 0
    values = list(read_samples(tmp_path / "s.bin"))
    assert values and all(decode(v).ts_ms < 1650816000000 for v in values)


def test_samples_file_framing(tmp_path):
    path = tmp_path / "f.bin"
    values = [bytes([i]) * (8 * i) for i in range(1, 50)]
    assert write_samples(path, values) == 49
    raw = path.read_bytes()
    assert raw[:4] == (8).to_bytes(4, "little") and raw[4:12] == b"\x01" * 8
    assert list(read_samples(path, chunk_bytes=5)) == values
    assert [v for b in read_sample_batches(path, batch_size=10) for v in b] == values
    path.write_bytes(raw[:-3])
    with pytest.raises(SamplesFileError, match="truncated"):
        list(read_samples(path))
    path.write_bytes(b"")
    assert list(read_samples(path)) == []


def test_progress_lines_on_long_builds(slice_events, tmp_path, caplog):
    """A long build says how far it is (events, samples, rate) at most every ``progress_s``."""
    import logging

    with caplog.at_level(logging.INFO, logger="streams.joiner.worker"):
        build_samples(slice_events[:2_000], tmp_path / "p.bin", tmp_path / "wp", PipelineConfig(),
                      batch_events=500, progress_s=0.0)
        build_samples(slice_events[:2_000], tmp_path / "q.bin", tmp_path / "wq", PipelineConfig(),
                      batch_events=500, progress_s=None)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("build_samples_progress")]
    assert [int(line.split("events=")[1].split()[0]) for line in lines] == [500, 1_000, 1_500, 2_000, 2_000]
