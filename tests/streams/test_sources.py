"""Replay sources without Kafka: the KuaiRand mapping on the bundled slice, generic JSONL/CSV, merge order."""
from __future__ import annotations

import csv
import gzip
import json
import logging
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.contracts import Click, Dwell, Feedback, FeedbackKind, Impression, activeness_code
from streams.replay import iter_events
from streams.sources import (GenericOptions, SourceError, merge_sources, open_source, open_sources,
                             parse_time_ms)
from streams.sources.kuairand import KuaiRandOptions, KuaiRandSource

REPO = Path(__file__).resolve().parents[2]
SLICE = REPO / "data" / "kuairand-slice"
SLICE_LOG = SLICE / "log_standard_slice.csv.gz"
SHARED = REPO.parent / "shared" / "data" / "kuairand-pure"
RANK = {Impression: 0, Click: 1, Dwell: 2, Feedback: 3}


def read_csv_gz(path: Path) -> tuple[list[str], list[list[str]]]:
    with gzip.open(path, "rt", newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, list(reader)


def expected_counts(path: Path, *, keep_duplicates: bool = False, autoplay: bool = False) -> dict[str, int]:
    """Per-type event counts straight from the CSV, independent of the source code."""
    header, rows = read_csv_gz(path)
    col = {name: header.index(name) for name in header}
    if not keep_duplicates:
        seen, unique = set(), []
        for row in rows:
            if tuple(row) not in seen:
                seen.add(tuple(row))
                unique.append(row)
        rows = unique
    clicks = sum(r[col["is_click"]] == "1" for r in rows)
    autoplay_rows = sum(r[col["is_click"]] != "1" and int(r[col["play_time_ms"]]) > 0 for r in rows)
    return {
        "Impression": len(rows),
        "Click": clicks,
        "Dwell": clicks + (autoplay_rows if autoplay else 0),
        "Feedback": sum(r[col["is_like"]] == "1" for r in rows) + sum(r[col["is_hate"]] == "1" for r in rows),
    }


def count_types(events) -> dict[str, int]:
    out = {"Impression": 0, "Click": 0, "Dwell": 0, "Feedback": 0}
    for e in events:
        out[type(e).__name__] += 1
    return out


@pytest.fixture(scope="module")
def slice_events() -> list:
    return list(iter_events([SLICE_LOG]))


def test_slice_counts_match_csv_and_readme(slice_events):
    expected = expected_counts(SLICE_LOG)
    assert count_types(slice_events) == expected
    # The figures documented in data/kuairand-slice/README.md.
    assert expected == {"Impression": 16857, "Click": 7476, "Dwell": 7476, "Feedback": 312}
    src = open_source(SLICE_LOG)
    list(src.keyed_events())
    assert (src.counters.rows, src.counters.duplicates_dropped) == (17145, 288)


def test_slice_order_ids_and_causality(slice_events):
    keys = [(e.ts_ms, RANK[type(e)]) for e in slice_events]
    assert keys == sorted(keys)
    ids = [e.event_id for e in slice_events]
    assert len(set(ids)) == len(ids)
    seen_impressions: dict[int, Impression] = {}
    for e in slice_events:
        if isinstance(e, Impression):
            assert e.impression_id == e.event_id and e.event_id >> 16 == e.ts_ms
            seen_impressions[e.impression_id] = e
            continue
        imp = seen_impressions[e.impression_id]  # every reaction follows its own impression
        assert (e.user_id, e.item_id) == (imp.user_id, imp.item_id)
        offset = {Click: 1, Dwell: 2}.get(type(e)) or (3 if e.kind == FeedbackKind.LIKE else 4)
        assert e.event_id - imp.event_id == offset
        if isinstance(e, Click):
            assert e.ts_ms == imp.ts_ms
        elif isinstance(e, Dwell):
            assert e.ts_ms == imp.ts_ms + e.dwell_ms
    assert list(iter_events([SLICE_LOG])) == slice_events  # a re-run gives identical events and ids


def test_slice_rows_map_to_events(slice_events):
    header, rows = read_csv_gz(SLICE_LOG)
    col = {name: header.index(name) for name in header}
    _, users = read_csv_gz(SLICE / "user_features_pure.csv.gz")
    vheader, videos = read_csv_gz(SLICE / "video_features_basic_pure.csv.gz")
    degree = {int(u[0]): u[1] for u in users}
    vcol = {name: vheader.index(name) for name in vheader}
    video = {int(v[0]): v for v in videos}
    impressions = [e for e in slice_events if isinstance(e, Impression)]
    by_id = {e.impression_id: e for e in impressions}
    reactions = {(type(e), e.impression_id): e for e in slice_events if not isinstance(e, Impression)}
    zero_duration_rows = 0
    for row in {tuple(r): None for r in rows}:  # de-duplicated, file order
        ts, user, item = int(row[col["time_ms"]]), int(row[col["user_id"]]), int(row[col["video_id"]])
        matches = [e for e in (by_id.get((ts << 16) | (j << 3)) for j in range(8)) if e and
                   (e.user_id, e.item_id) == (user, item)]
        assert matches, row
        imp = matches[0]
        assert imp.activeness == activeness_code(degree[user]) and imp.age_group == -1
        tag = video[item][vcol["tag"]]
        assert imp.item_category == (int(tag.split(",")[0]) if tag else -1)
        duration = int(row[col["duration_ms"]])
        if duration == 0:
            zero_duration_rows += 1
            vd = video[item][vcol["video_duration"]]
            assert imp.item_duration_ms == (int(float(vd)) if vd else 0)
        else:
            assert imp.item_duration_ms == duration
        play = int(row[col["play_time_ms"]])
        clicked = row[col["is_click"]] == "1"
        assert ((Click, imp.impression_id) in reactions) == clicked
        dwell = reactions.get((Dwell, imp.impression_id))
        assert (dwell is not None) == clicked
        if dwell is not None:
            assert dwell.dwell_ms == play
    assert zero_duration_rows > 0  # the fallback branch was exercised


def test_keep_duplicates_and_autoplay_dwell():
    events = list(iter_events([SLICE_LOG], kuairand=KuaiRandOptions(keep_duplicates=True, autoplay_dwell=True)))
    assert count_types(events) == expected_counts(SLICE_LOG, keep_duplicates=True, autoplay=True)
    assert len({e.event_id for e in events}) == len(events)


def test_feature_tables_found_next_to_log_or_given(tmp_path, caplog):
    shutil.copy(SLICE_LOG, tmp_path / "log.csv.gz")
    with caplog.at_level(logging.WARNING, logger="streams.sources.kuairand"):
        bare = next(open_source(tmp_path / "log.csv.gz").keyed_events())[3]
    assert "feature table missing" in caplog.text
    assert (bare.activeness, bare.item_category) == (0, -1)
    explicit = KuaiRandOptions(users_path=SLICE / "user_features_pure.csv.gz",
                               videos_path=SLICE / "video_features_basic_pure.csv.gz")
    given_ = next(open_source(tmp_path / "log.csv.gz", kuairand=explicit).keyed_events())[3]
    auto = next(open_source(SLICE_LOG).keyed_events())[3]
    assert given_ == auto and auto.activeness > 0
    shutil.copy(SLICE / "user_features_pure.csv.gz", tmp_path / "user_features_a.csv.gz")
    shutil.copy(SLICE / "user_features_pure.csv.gz", tmp_path / "user_features_b.csv.gz")
    with pytest.raises(SourceError, match="several files match"):
        open_source(tmp_path / "log.csv.gz")


def test_unsorted_kuairand_log_names_file_and_line(tmp_path):
    header, rows = read_csv_gz(SLICE_LOG)
    path = tmp_path / "log_bad.csv"
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, rows[1], rows[0]])
    with pytest.raises(SourceError, match=r"log_bad\.csv:3: time_ms=\d+ < previous"):
        list(iter_events([path]))


def test_directory_input_and_unknown_format(tmp_path):
    assert [p.name for p in open_sources([SLICE])[0:1] for p in [p.path]] == [SLICE_LOG.name]
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SourceError, match="unknown format"):
        open_source(tmp_path / "x.csv")
    with pytest.raises(SourceError, match="no log_"):
        open_sources([tmp_path])


# ---- generic JSONL / CSV ---------------------------------------------------------------------

def jsonl(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


IMP = {"type": "impression", "event_id": 10, "ts_ms": 1000, "user_id": 1, "item_id": 2, "impression_id": 10}


def test_generic_jsonl_and_csv_give_the_same_events(tmp_path):
    rows = [
        {"type": "feedback", "event_id": 13, "ts_ms": 1500, "user_id": 1, "item_id": 2, "kind": "Like",
         "impression_id": 10},
        {"type": "dwell", "event_id": 12, "ts_ms": 1500, "impression_id": 10, "user_id": 1, "item_id": 2,
         "dwell_ms": 500},
        {"type": "click", "event_id": 11, "ts_ms": 1000, "impression_id": 10, "user_id": 1, "item_id": 2},
        {**IMP, "activeness": 2, "item_category": 7},
        {"type": "feedback", "event_id": 14, "ts_ms": 900, "user_id": 1, "item_id": 2, "kind": 2},
    ]
    from_jsonl = list(iter_events([jsonl(tmp_path / "e.jsonl", rows)]))
    cols = ["type", "event_id", "ts_ms", "user_id", "item_id", "impression_id", "activeness", "item_category",
            "dwell_ms", "kind"]
    with gzip.open(tmp_path / "e.csv.gz", "wt", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for r in rows:
            w.writerow([r.get(c, "") for c in cols])
    from_csv = list(iter_events([tmp_path / "e.csv.gz"]))
    assert from_jsonl == from_csv
    assert [e.event_id for e in from_jsonl] == [14, 10, 11, 12, 13]
    assert from_jsonl[0] == Feedback(14, 900, 1, 2, FeedbackKind.DISLIKE, None)
    assert from_jsonl[1] == Impression(10, 1000, 1, 2, 10, activeness=2, item_category=7)
    assert from_jsonl[4].kind == FeedbackKind.LIKE


@pytest.mark.parametrize("line, reason", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({**IMP, "type": "view"}), "type='view' is not one of"),
    (json.dumps({**IMP, "dwell_ms": 5}), "field 'dwell_ms' does not belong to type impression"),
    (json.dumps({k: v for k, v in IMP.items() if k != "user_id"}), r"impression lacks required field\(s\) \['user_id'\]"),
    (json.dumps({**IMP, "ts_ms": "soon"}), "ts_ms='soon' is not an integer"),
    (json.dumps({**IMP, "user_id": -3}), "user_id=-3 < 0"),
    (json.dumps({**IMP, "event_id": 1}), "event_id=1 repeats an earlier line"),
])
def test_malformed_jsonl_line_reported_with_file_and_line(tmp_path, line, reason):
    path = jsonl(tmp_path / "bad.jsonl", [{**IMP, "event_id": 1}, "", line])
    with pytest.raises(SourceError, match=rf"bad\.jsonl:3: {reason}"):
        list(iter_events([path]))
    src = open_source(path, generic=GenericOptions(skip_bad_lines=True))
    assert len(list(src.keyed_events())) == 1
    assert src.counters.bad_lines == 1 and src.counters.first_bad_line.startswith(f"{path}:3:")


def test_malformed_csv_rows(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("type,event_id,ts_ms,user_id,item_id,impression_id,dwell_ms\n"
                    "impression,1,5,1,2,1,\n"
                    "click,2,5,1,2\n"
                    "click,3,5,1,2,1,40\n")
    with pytest.raises(SourceError, match=r"bad\.csv:3: 5 cells, header has 7"):
        list(iter_events([path]))
    src = open_source(path, generic=GenericOptions(skip_bad_lines=True))
    assert [e.event_id for *_k, e in src.keyed_events()] == [1]
    assert src.counters.bad_lines == 2
    (tmp_path / "cols.csv").write_text("type,event_id,colour\n")
    with pytest.raises(SourceError, match=r"cols\.csv:1: .*\['colour'\]"):
        list(iter_events([tmp_path / "cols.csv"]))


def test_window_filters_on_event_time(slice_events):
    start, end = slice_events[1000].ts_ms, slice_events[5000].ts_ms
    inside = [e for e in slice_events if start <= e.ts_ms < end]
    iso_start = "2022-04-24T15:00:00Z"
    assert list(iter_events([SLICE_LOG], from_ms=start, until_ms=end)) == inside
    assert list(iter_events([SLICE_LOG], from_ms=str(start), until_ms=str(end))) == inside
    assert list(iter_events([SLICE_LOG], from_ms=iso_start)) == slice_events
    assert parse_time_ms("2022-04-24T15:00:00Z") == parse_time_ms("2022-04-24T23:00:00+08:00") == 1650812400000
    assert parse_time_ms("2022-04-24T15:00:00") == 1650812400000  # naive = UTC
    with pytest.raises(ValueError, match="neither epoch milliseconds nor an ISO-8601"):
        parse_time_ms("yesterday")


events_strategy = st.lists(
    st.tuples(st.integers(0, 30), st.sampled_from(["impression", "click", "dwell", "feedback"]), st.booleans()),
    min_size=1, max_size=40)


@settings(max_examples=40, deadline=None)
@given(events_strategy)
def test_merge_of_files_is_event_time_ordered_and_deterministic(tmp_path_factory, spec):
    """Events split over two files merge into one order: (ts, rank, file, line); none lost or added."""
    d = tmp_path_factory.mktemp("merge")
    files: list[list[dict]] = [[], []]
    for i, (ts, kind, second) in enumerate(spec):
        row = {"type": kind, "event_id": i, "ts_ms": ts, "user_id": 1, "item_id": 1}
        row.update({"impression": {"impression_id": i}, "click": {"impression_id": 0},
                    "dwell": {"impression_id": 0, "dwell_ms": 1}, "feedback": {"kind": 1}}[kind])
        files[second].append(row)
    paths = [jsonl(d / "a.jsonl", files[0]), jsonl(d / "b.jsonl", files[1])]
    merged = list(iter_events(paths))
    rank = {"impression": 0, "click": 1, "dwell": 2, "feedback": 3}
    reference = sorted(((r["ts_ms"], rank[r["type"]], f, line, r["event_id"])
                        for f, rows in enumerate(files) for line, r in enumerate(rows)))
    assert [e.event_id for e in merged] == [k[-1] for k in reference]
    assert [e.event_id for e in merge_sources(open_sources(paths))] == [e.event_id for e in merged]


@pytest.mark.skipif(not (SHARED / "log_standard_4_25_to_5_08_pure.csv.gz").exists(),
                    reason="the full KuaiRand-Pure log is not present beside the repository")
def test_slice_script_reproduces_bundled_files(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_slice", REPO / "scripts" / "make_kuairand_slice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.cut(SHARED, tmp_path, None, module.parse_time_ms("2022-04-26T00:00:00Z"))
    for name in ("log_standard_slice.csv.gz", "user_features_pure.csv.gz", "video_features_basic_pure.csv.gz"):
        assert (tmp_path / name).read_bytes() == (SLICE / name).read_bytes(), name


def test_kuairand_source_reads_slice_directly():
    src = KuaiRandSource(SLICE_LOG, KuaiRandOptions())
    assert src.users_path.name == "user_features_pure.csv.gz"
    assert src.videos_path.name == "video_features_basic_pure.csv.gz"
    assert len(src.fingerprint()) == 64
    assert src.fingerprint() != KuaiRandSource(SLICE_LOG, KuaiRandOptions(autoplay_dwell=True)).fingerprint()


LOG_HEADER = ["user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
              "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
              "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab"]
row_strategy = st.tuples(
    st.integers(0, 3),  # user
    st.integers(0, 3),  # video
    st.integers(0, 5),  # time_ms offset: many rows share a millisecond
    st.booleans(), st.booleans(), st.booleans(),  # click, like, hate
    st.sampled_from([0, 0, 1, 2, 7, 5000]),  # play_time_ms
    st.integers(0, 2),  # repeat count: exact duplicates
)


@settings(max_examples=60, deadline=None)
@given(st.lists(row_strategy, min_size=1, max_size=30), st.booleans(), st.booleans())
def test_kuairand_mapping_invariants(tmp_path_factory, spec, keep_duplicates, autoplay):
    """Synthetic logs: one impression per (de-duplicated) row, reactions per flag, causal order, unique ids."""
    d = tmp_path_factory.mktemp("kr")
    rows = []
    for user, video, t, click, like, hate, play, repeat in spec:
        row = [user, video, 20220425, 0, 1_650_000_000_000 + t, int(click), int(like), 0, 0, 0, int(hate), 0,
               play, 1000, 0, 0, 0, 0, 1]
        rows.extend([[str(v) for v in row]] * (repeat + 1))
    rows.sort(key=lambda r: int(r[4]))
    with (d / "log.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows([LOG_HEADER, *rows])
    options = KuaiRandOptions(keep_duplicates=keep_duplicates, autoplay_dwell=autoplay)
    events = list(iter_events([d / "log.csv"], kuairand=options))

    replayed = rows if keep_duplicates else list({tuple(r): r for r in rows}.values())
    col = {name: i for i, name in enumerate(LOG_HEADER)}
    flag = lambda name: sum(r[col[name]] == "1" for r in replayed)  # noqa: E731
    autoplay_rows = sum(r[col["is_click"]] == "0" and int(r[col["play_time_ms"]]) > 0 for r in replayed)
    assert count_types(events) == {
        "Impression": len(replayed), "Click": flag("is_click"),
        "Dwell": flag("is_click") + (autoplay_rows if autoplay else 0),
        "Feedback": flag("is_like") + flag("is_hate")}
    assert len({e.event_id for e in events}) == len(events)
    keys = [(e.ts_ms, RANK[type(e)]) for e in events]
    assert keys == sorted(keys)
    shown: dict[int, Impression] = {}
    for e in events:
        if isinstance(e, Impression):
            assert (e.activeness, e.item_category, e.item_duration_ms) == (0, -1, 1000)  # no feature tables
            shown[e.impression_id] = e
        else:
            imp = shown[e.impression_id]
            play = e.ts_ms - imp.ts_ms
            assert play == 0 if isinstance(e, Click) else play >= 0
