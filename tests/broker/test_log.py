"""PartitionLog and LogManager on real files: round trips, segments, indexes, recovery, retention."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.record.memory_records import MemoryRecords

from streams.broker.config import LogConfig
from streams.broker.log import (
    CorruptTopicMetaError,
    DataDirLockedError,
    InvalidConfigError,
    InvalidTopicError,
    LogClosedError,
    LogManager,
    OffsetOutOfRangeError,
    PartitionLog,
    TopicExistsError,
    UnknownTopicError,
)
from streams.broker.records import COMPRESSION_GZIP, CorruptRecordError, iter_batches, parse_header
from tests.broker.test_records import make_batch

REPO_ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """Injected clock (milliseconds)."""

    def __init__(self, now_ms: int = 1_000_000) -> None:
        self.now_ms = now_ms

    def __call__(self) -> int:
        return self.now_ms


def decode(data: bytes) -> list[tuple[int, bytes | None, bytes | None, int]]:
    """(offset, key, value, timestamp) of every record, checking each batch's CRC on the way."""
    out = []
    records = MemoryRecords(data)
    while records.has_next():
        batch = records.next_batch()
        assert batch.validate_crc()
        out.extend((r.offset, r.key, r.value, r.timestamp) for r in batch)
    return out


def read_all(log: PartitionLog, start: int | None = None, max_bytes: int = 64 * 1024):
    """Fetch loop like a consumer: read, drop records before the fetch offset, advance."""
    offset = log.log_start_offset if start is None else start
    out = []
    while offset < log.log_end_offset:
        records = [r for r in decode(log.read(offset, max_bytes)) if r[0] >= offset]
        assert records and records[0][0] == offset
        out.extend(records)
        offset = records[-1][0] + 1
    return out


def config(**kw) -> LogConfig:
    kw.setdefault("fsync", "never")
    return LogConfig(**kw)


def test_round_trip_rewrites_offsets_and_keeps_crc(tmp_path):
    log = PartitionLog(tmp_path / "p", config())
    assert (log.log_start_offset, log.log_end_offset, log.size_bytes) == (0, 0, 0)
    assert log.append(make_batch([b"a", b"b", b"c"], ts=10)) == 0
    assert log.append(make_batch([b"d"], ts=20) + make_batch([b"e", b"f"], ts=30)) == 3
    assert log.log_end_offset == 6
    records = decode(log.read(0, 1 << 20))
    assert [(o, v, t) for o, _, v, t in records] == [
        (0, b"a", 10), (1, b"b", 11), (2, b"c", 12), (3, b"d", 20), (4, b"e", 30), (5, b"f", 31),
    ]
    assert [h.base_offset for _, h in iter_batches(log.read(0, 1 << 20))] == [0, 3, 4]
    assert log.read(6, 1000) == b""
    log.close()


def test_read_from_mid_batch_returns_the_containing_batch(tmp_path):
    log = PartitionLog(tmp_path / "p", config(index_interval_bytes=1))
    for i in range(10):
        log.append(make_batch([b"%d-%d" % (i, j) for j in range(5)]))
    data = log.read(17, 1)
    assert parse_header(data).base_offset == 15
    assert [r[0] for r in decode(data)] == [15, 16, 17, 18, 19]
    assert [r[2] for r in read_all(log, start=17)][:3] == [b"3-2", b"3-3", b"3-4"]


def test_read_returns_whole_batches_within_max_bytes_and_one_oversized_batch(tmp_path):
    log = PartitionLog(tmp_path / "p", config())
    small = [make_batch([b"x" * 100]) for _ in range(5)]
    big = make_batch([b"y" * 5000])
    for raw in small:
        log.append(raw)
    log.append(big)
    size = len(small[0])
    assert len(log.read(0, 3 * size + size // 2)) == 3 * size  # whole batches only
    assert len(log.read(0, 3 * size)) == 3 * size
    assert len(log.read(0, 0)) == size  # KIP-74: at least one batch
    assert len(log.read(5, 10)) == len(big)
    assert decode(log.read(5, 10))[0][2] == b"y" * 5000
    assert len(log.read(0, 1 << 20)) == 5 * size + len(big)


def test_offsets_out_of_range(tmp_path):
    log = PartitionLog(tmp_path / "p", config())
    log.append(make_batch([b"a"]))
    with pytest.raises(OffsetOutOfRangeError):
        log.read(2, 100)
    with pytest.raises(OffsetOutOfRangeError):
        log.read(-1, 100)
    with pytest.raises(ValueError, match="max_bytes=-1"):
        log.read(0, -1)


def test_segments_roll_and_reads_cross_them(tmp_path):
    log = PartitionLog(tmp_path / "p", config(segment_bytes=2048, index_interval_bytes=256))
    expected = []
    for i in range(60):
        values = [b"v%d-%d" % (i, j) for j in range(1 + i % 4)]
        base = log.append(make_batch(values, ts=1000 * i))
        expected.extend((base + j, v) for j, v in enumerate(values))
    assert log.n_segments >= 4
    names = sorted(p.name for p in (tmp_path / "p").glob("*.log"))
    assert names[0] == "00000000000000000000.log" and len(names) == log.n_segments
    assert all(p.stat().st_size <= 2048 for p in (tmp_path / "p").glob("*.log"))
    assert [(o, v) for o, _, v, _ in read_all(log, max_bytes=700)] == expected
    for offset, value in expected[::7]:  # random access lands in the right batch of the right segment
        assert (offset, value) in [(o, v) for o, _, v, _ in decode(log.read(offset, 1))]
    log.close()


def test_segment_rolls_on_age(tmp_path):
    clock = Clock()
    log = PartitionLog(tmp_path / "p", config(segment_ms=1000), now_ms=clock)
    log.append(make_batch([b"a"]))
    clock.now_ms += 999
    log.append(make_batch([b"b"]))
    assert log.n_segments == 1
    clock.now_ms += 1
    log.append(make_batch([b"c"]))
    assert log.n_segments == 2
    assert [r[2] for r in read_all(log)] == [b"a", b"b", b"c"]


def _oracle_for_timestamp(records, ts_ms):
    hits = [(o, t) for o, _, _, t in records if t >= ts_ms]
    return min(hits) if hits else None


def test_offset_for_timestamp_is_exact(tmp_path):
    log = PartitionLog(tmp_path / "p", config(segment_bytes=1500, index_interval_bytes=200))
    # distinct per-record timestamps, not monotonic across or within batches
    for i in range(40):
        stamps = [10_000 + 100 * i + d for d in (5, 1, 9, 3)]
        if i % 10 == 7:
            stamps = [500 + s for s in (0, 1, 2, 3)]  # a late batch with old timestamps
        log.append(make_batch([b"v"] * 4, ts=stamps, compression=COMPRESSION_GZIP if i % 3 == 0 else 0))
    assert log.n_segments > 3
    records = read_all(log)
    probes = [0, 500, 503, 504, 10_000, 10_004, 10_006, 10_009, 10_010, 11_702, 13_000, 13_909, 13_910, 99_999]
    for ts in probes:
        assert log.offset_for_timestamp(ts) == _oracle_for_timestamp(records, ts), ts
    top = max(t for *_, t in records)
    assert log.max_timestamp_offset() == min((o, t) for o, _, _, t in records if t == top)
    log.close()
    reopened = PartitionLog(tmp_path / "p", config(segment_bytes=1500, index_interval_bytes=200))
    for ts in probes:
        assert reopened.offset_for_timestamp(ts) == _oracle_for_timestamp(records, ts), ts
    assert reopened.max_timestamp_offset() == min((o, t) for o, _, _, t in records if t == top)


def test_empty_log_timestamps(tmp_path):
    log = PartitionLog(tmp_path / "p", config())
    assert log.offset_for_timestamp(0) is None
    assert log.max_timestamp_offset() is None
    with pytest.raises(ValueError, match="ts_ms=-1"):
        log.offset_for_timestamp(-1)


def test_reopen_after_close_keeps_everything_and_appends_continue(tmp_path):
    cfg = config(segment_bytes=1024, index_interval_bytes=64)
    log = PartitionLog(tmp_path / "p", cfg)
    for i in range(30):
        log.append(make_batch([b"%d" % i, b"x"]))
    before = read_all(log)
    log.close()
    with pytest.raises(LogClosedError):
        log.append(make_batch([b"late"]))
    (tmp_path / "p" / f"{10**9:020d}.index").write_bytes(b"")  # orphan left by a cut-short deletion
    log = PartitionLog(tmp_path / "p", cfg)
    assert log.log_end_offset == 60 and read_all(log) == before
    assert not (tmp_path / "p" / f"{10**9:020d}.index").exists()
    assert log.append(memoryview(make_batch([b"next"]))) == 60
    assert read_all(log, start=60)[0][2] == b"next"
    log.delete()
    assert not (tmp_path / "p").exists()


def test_sealed_segment_indexes_rebuilt_when_missing(tmp_path):
    cfg = config(segment_bytes=1024, index_interval_bytes=64)
    log = PartitionLog(tmp_path / "p", cfg)
    for i in range(30):
        log.append(make_batch([b"%d" % i], ts=100 + i))
    before = read_all(log)
    log.close()
    first, second = sorted(p.with_suffix("") for p in (tmp_path / "p").glob("*.log"))[:2]
    first.with_suffix(".index").unlink()
    first.with_suffix(".timeindex").write_bytes(b"\x01\x02\x03")  # not a whole entry
    second.with_suffix(".index").unlink()  # time index intact, offset index gone
    log = PartitionLog(tmp_path / "p", cfg)
    assert read_all(log) == before
    assert log.offset_for_timestamp(103) == (3, 103)
    assert first.with_suffix(".index").stat().st_size > 0
    assert second.with_suffix(".index").stat().st_size > 0
    assert first.with_suffix(".timeindex").stat().st_size % 12 == 0


def test_damaged_sealed_segment_is_reported_not_misread(tmp_path, caplog):
    cfg = config(segment_bytes=1024, index_interval_bytes=64)
    log = PartitionLog(tmp_path / "p", cfg)
    for i in range(30):
        log.append(make_batch([b"%d" % i]))
    log.close()
    first = tmp_path / "p" / f"{0:020d}.log"
    with open(first, "r+b") as f:
        f.truncate(first.stat().st_size // 2)
    with caplog.at_level("WARNING", logger="streams.broker.log"):
        log = PartitionLog(tmp_path / "p", cfg)
    assert "segment indexes rebuilt" in caplog.text
    second_base = sorted(int(p.stem) for p in (tmp_path / "p").glob("*.log"))[1]
    assert decode(log.read(0, 1))[0][2] == b"0"
    with pytest.raises(CorruptRecordError, match="missing"):
        log.read(second_base - 1, 100)
    assert decode(log.read(second_base, 1))[0][2] == b"%d" % second_base


def _last_segment(directory: Path) -> Path:
    return sorted(directory.glob("*.log"))[-1]


@pytest.mark.parametrize("damage", ["truncate_mid_batch", "garbage_tail", "bad_crc_tail", "zero_tail"])
def test_torn_tail_is_truncated_and_appends_continue(tmp_path, damage, caplog):
    cfg = config(index_interval_bytes=128)
    log = PartitionLog(tmp_path / "p", cfg)
    for i in range(20):
        log.append(make_batch([b"%d" % i] * 3))
    good_end, good_size = log.log_end_offset, log.size_bytes
    last = make_batch([b"torn"] * 3)
    log.append(last)
    log.close()
    path = _last_segment(tmp_path / "p")
    with open(path, "r+b") as f:
        if damage == "truncate_mid_batch":
            f.truncate(good_size + len(last) // 2)
        elif damage == "garbage_tail":
            f.seek(0, os.SEEK_END)
            f.write(b"\x00\x00\x00\x00\x00\x00\x00\x05\xde\xad\xbe\xef" * 10)
            good_end, good_size = good_end + 3, good_size + len(last)
        elif damage == "bad_crc_tail":
            f.seek(good_size + len(last) - 1)
            f.write(b"\xff" if last[-1] != 0xFF else b"\x00")
        else:  # a crash after the size grew but before the data reached the disk
            f.truncate(good_size)
            f.seek(good_size)
            f.write(bytes(len(last)))
    with caplog.at_level("WARNING", logger="streams.broker.log"):
        log = PartitionLog(tmp_path / "p", cfg)
    assert "log truncated" in caplog.text
    assert (log.log_end_offset, log.size_bytes, path.stat().st_size) == (good_end, good_size, good_size)
    assert log.append(make_batch([b"after"])) == good_end
    records = read_all(log)
    assert [r[0] for r in records] == list(range(good_end + 1))
    assert records[-1][2] == b"after"


def test_index_entries_beyond_truncated_log_are_dropped(tmp_path):
    cfg = config(index_interval_bytes=1)
    log = PartitionLog(tmp_path / "p", cfg)
    sizes = [len(make_batch([b"%d" % i])) for i in range(10)]
    for i in range(10):
        log.append(make_batch([b"%d" % i]))
    log.close()
    with open(_last_segment(tmp_path / "p"), "r+b") as f:
        f.truncate(sum(sizes[:4]) + 3)  # the index still points at batches 4..9
    log = PartitionLog(tmp_path / "p", cfg)
    assert log.log_end_offset == 4
    assert log.append(make_batch([b"new"])) == 4
    assert [r[2] for r in read_all(log)] == [b"0", b"1", b"2", b"3", b"new"]
    log.close()
    log = PartitionLog(tmp_path / "p", cfg)
    assert [r[2] for r in read_all(log)] == [b"0", b"1", b"2", b"3", b"new"]


@pytest.mark.parametrize("recovery_point", ["stale", "missing"])
def test_damage_after_the_recovery_point_is_found_even_before_the_last_index_entry(tmp_path, recovery_point):
    cfg = config(index_interval_bytes=1)  # an index entry for every batch
    log = PartitionLog(tmp_path / "p", cfg)
    sizes = []
    for i in range(20):
        raw = make_batch([b"%d" % i])
        sizes.append(len(raw))
        log.append(raw)
        if i == 9:
            log.flush()
    assert (tmp_path / "p" / "recovery-point").read_text() == "10"
    log.close()
    if recovery_point == "stale":  # as if the process died before the next flush
        (tmp_path / "p" / "recovery-point").write_text("10")
    else:
        (tmp_path / "p" / "recovery-point").unlink()
    with open(_last_segment(tmp_path / "p"), "r+b") as f:  # a page that never reached the disk
        f.seek(sum(sizes[:14]) + 30)
        f.write(bytes(8))
    log = PartitionLog(tmp_path / "p", cfg)
    assert log.log_end_offset == 14
    assert [r[2] for r in read_all(log)] == [b"%d" % i for i in range(14)]


def test_recovery_point_tracks_flushes(tmp_path):
    clock = Clock()
    point = tmp_path / "p" / "recovery-point"
    log = PartitionLog(tmp_path / "p", LogConfig(fsync="always", fsync_interval_ms=100), now_ms=clock)
    log.append(make_batch([b"a", b"b"]))
    assert not point.exists()
    assert not log.maybe_flush(clock.now_ms + 100)  # nothing left to fsync ...
    assert point.read_text() == "2"  # ... but the recovery point moves on the same schedule
    log.append(make_batch([b"c"]))
    log.close()
    assert point.read_text() == "3"


_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from streams.broker.config import LogConfig
    from streams.broker.log import PartitionLog
    from tests.broker.test_records import make_batch

    log = PartitionLog(Path(sys.argv[1]), LogConfig(fsync=sys.argv[2], segment_bytes=8192))
    i = 0
    while True:
        offset = log.append(make_batch([b"%d-%d" % (i, j) for j in range(3)]))
        print(i, offset, flush=True)
        i += 1
    """
)


@pytest.mark.parametrize("fsync", ["never", "interval"])
def test_acknowledged_appends_survive_kill_9(tmp_path, fsync):
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path / "p"), fsync],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    acked = []
    deadline = time.monotonic() + 60
    try:
        while len(acked) < 400 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            i, offset = map(int, line.split())
            acked.append((i, offset))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # the last line may be cut by the kill ("123 " or "123 4" without its newline): whole lines only
    tail = proc.stdout.read()
    complete = tail.splitlines()[:-1] if tail and not tail.endswith("\n") else tail.splitlines()
    acked.extend(tuple(map(int, line.split())) for line in complete if len(line.split()) == 2)
    assert len(acked) >= 400, f"writer acknowledged only {len(acked)} appends"
    log = PartitionLog(tmp_path / "p", LogConfig(fsync="never", segment_bytes=8192))
    assert log.n_segments > 1
    values = {o: v for o, _, v, _ in read_all(log)}
    for i, offset in acked:
        assert offset == 3 * i
        assert [values[offset + j] for j in range(3)] == [b"%d-%d" % (i, j) for j in range(3)]
    assert log.append(make_batch([b"after"])) == log.log_end_offset - 1


def test_corrupt_input_is_rejected_all_or_nothing(tmp_path):
    log = PartitionLog(tmp_path / "p", config())
    log.append(make_batch([b"keep"]))
    good = make_batch([b"a", b"b"])
    bad_crc = bytearray(make_batch([b"c"]))
    bad_crc[-1] ^= 0x55
    magic1 = bytearray(good)
    magic1[16] = 1
    bad_count = bytearray(good)
    bad_count[57:61] = (5).to_bytes(4, "big")
    for payload in (good + good[:-3], good + bytes(bad_crc), good + bytes(magic1), bytes(bad_count), b"", b"\x00" * 30):
        with pytest.raises(CorruptRecordError):
            log.append(payload)
    assert (log.log_end_offset, log.size_bytes) == (1, len(make_batch([b"keep"])))
    assert [r[2] for r in read_all(log)] == [b"keep"]


def test_crc_check_on_append_can_be_disabled(tmp_path):
    log = PartitionLog(tmp_path / "p", config(verify_crc_on_append=False))
    bad_crc = bytearray(make_batch([b"c"]))
    bad_crc[-1] ^= 0x55
    assert log.append(bytes(bad_crc)) == 0


def test_fsync_interval_policy(tmp_path):
    clock = Clock()
    log = PartitionLog(tmp_path / "p", LogConfig(fsync="interval", fsync_interval_ms=100), now_ms=clock)
    assert not log.maybe_flush()  # nothing written
    log.append(make_batch([b"a"]))
    assert not log.maybe_flush(clock.now_ms + 50)
    assert log.maybe_flush(clock.now_ms + 100)
    assert not log.maybe_flush(clock.now_ms + 1000)  # already clean
    clock.now_ms += 1000
    log.append(make_batch([b"b"]))  # append itself flushes when the interval has passed
    assert not log.maybe_flush(clock.now_ms + 50)
    never = PartitionLog(tmp_path / "q", LogConfig(fsync="never"), now_ms=clock)
    never.append(make_batch([b"a"]))
    assert not never.maybe_flush(clock.now_ms + 10**9)
    never.flush()
    always = PartitionLog(tmp_path / "r", LogConfig(fsync="always"), now_ms=clock)
    assert always.append(make_batch([b"a"])) == 0
    assert not always.maybe_flush(clock.now_ms + 10**9)


def test_retention_by_bytes_never_deletes_active_segment(tmp_path):
    log = PartitionLog(tmp_path / "p", config(segment_bytes=1024, retention_bytes=2500, retention_ms=-1))
    for i in range(100):
        log.append(make_batch([b"%d" % i] * 5))
    n_before, size_before = log.n_segments, log.size_bytes
    deleted = log.enforce_retention()
    assert deleted == n_before - log.n_segments > 0
    assert 2500 <= log.size_bytes < 2500 + 1024 < size_before
    assert log.log_start_offset > 0
    assert sorted(p.name for p in (tmp_path / "p").iterdir())[0].startswith(f"{log.log_start_offset:020d}")
    with pytest.raises(OffsetOutOfRangeError):
        log.read(log.log_start_offset - 1, 100)
    assert read_all(log)[0][0] == log.log_start_offset
    assert log.enforce_retention() == 0
    tiny = PartitionLog(tmp_path / "q", config(segment_bytes=1024, retention_bytes=1))
    tiny.append(make_batch([b"x" * 2000]))
    assert tiny.enforce_retention() == 0 and tiny.log_end_offset == 1  # the active segment stays
    log.close()
    assert PartitionLog(tmp_path / "p", config(segment_bytes=1024)).log_start_offset == log.log_start_offset


def test_retention_by_time_uses_largest_timestamp(tmp_path):
    clock = Clock(now_ms=0)
    log = PartitionLog(tmp_path / "p", config(segment_bytes=1024, retention_ms=60_000), now_ms=clock)

    def ts(offset: int) -> int:
        return 9_000_000 + 10_000 * offset

    for i in range(40):
        log.append(make_batch([b"x" * 50], ts=ts(i)))
    bases = [int(p.stem) for p in sorted((tmp_path / "p").glob("*.log"))]
    assert len(bases) >= 4
    clock.now_ms = ts(bases[1] - 1) + 60_000  # the first segment's newest record is exactly 60 s old
    assert log.enforce_retention() == 0
    clock.now_ms += 1
    assert log.enforce_retention() == 1
    assert log.log_start_offset == bases[1] and not (tmp_path / "p" / f"{0:020d}.log").exists()
    clock.now_ms = ts(39) + 10**9  # everything expired: all but the active segment go
    assert log.enforce_retention() == len(bases) - 2
    assert (log.n_segments, log.log_start_offset, log.log_end_offset) == (1, bases[-1], 40)
    assert [r[0] for r in read_all(log)] == list(range(bases[-1], 40))
    assert log.append(make_batch([b"more"])) == 40


def test_retention_by_time_deletes_only_an_expired_prefix(tmp_path):
    clock = Clock(now_ms=1_000_000)
    log = PartitionLog(tmp_path / "p", config(segment_bytes=1024, retention_ms=1000), now_ms=clock)
    for i in range(30):
        log.append(make_batch([b"x" * 50], ts=990_000 if i < 10 else 999_900))  # old, then recent
    bases = [int(p.stem) for p in sorted((tmp_path / "p").glob("*.log"))]
    assert log.enforce_retention() >= 1
    assert log.log_start_offset == max(b for b in bases if b <= 10)  # the segment holding offset 10 stays

    recent_first = PartitionLog(tmp_path / "q", config(segment_bytes=1024, retention_ms=1000), now_ms=clock)
    for i in range(30):
        recent_first.append(make_batch([b"x" * 50], ts=999_900 if i < 10 else 990_000))
    assert recent_first.enforce_retention() == 0  # an unexpired segment shields the expired ones after it


def test_compact_topics_are_exempt_from_retention(tmp_path):
    clock = Clock(now_ms=10**12)
    manager = LogManager(tmp_path, config(segment_bytes=1024, retention_ms=1000, retention_bytes=2048), now_ms=clock)
    manager.create_topic("events", 1)
    manager.create_topic("table-changelog", 1, {"cleanup.policy": "compact"})
    manager.create_topic("both", 1, {"cleanup.policy": "compact,delete"})
    for topic in ("events", "table-changelog", "both"):
        for i in range(40):
            manager.get(topic, 0).append(make_batch([b"x" * 50], ts=1000))
    assert manager.enforce_retention_all() > 0
    assert manager.get("events", 0).log_start_offset > 0
    assert manager.get("both", 0).log_start_offset > 0
    assert manager.get("table-changelog", 0).log_start_offset == 0
    assert manager.enforce_retention_all() == 0


def test_manager_create_reload_delete(tmp_path):
    manager = LogManager(tmp_path / "data", config())
    manager.create_topic("clicks", 3, {"retention.ms": "60000", "segment.bytes": "2048", "x.unknown": "kept"})
    manager.create_topic("__consumer_offsets", 1)
    assert manager.topics() == {"clicks": 3, "__consumer_offsets": 1}
    assert manager.topic_configs("clicks") == {"retention.ms": "60000", "segment.bytes": "2048", "x.unknown": "kept"}
    assert manager.get("clicks", 2).config.retention_ms == 60000
    assert manager.get("clicks", 2).config.segment_bytes == 2048
    manager.get("clicks", 1).append(make_batch([b"hello"]))
    meta = json.loads((tmp_path / "data" / "clicks" / "meta.json").read_text())
    assert meta["partitions"] == 3
    with pytest.raises(TopicExistsError):
        manager.create_topic("clicks", 1)
    with pytest.raises(UnknownTopicError):
        manager.get("nope", 0)
    with pytest.raises(ValueError, match="partition=3"):
        manager.get("clicks", 3)
    manager.close()

    (tmp_path / "data" / "half~new").mkdir()  # a creation cut short
    (tmp_path / "data" / "not-a-topic").mkdir()  # no meta.json: ignored
    manager = LogManager(tmp_path / "data", config())
    assert manager.topics() == {"clicks": 3, "__consumer_offsets": 1}
    with pytest.raises(TopicExistsError, match="not a topic"):
        manager.create_topic("not-a-topic", 1)
    assert not (tmp_path / "data" / "half~new").exists()
    assert [r[2] for r in read_all(manager.get("clicks", 1))] == [b"hello"]
    assert manager.get("clicks", 0).config.segment_bytes == 2048
    manager.delete_topic("clicks")
    assert manager.topics() == {"__consumer_offsets": 1}
    assert not (tmp_path / "data" / "clicks").exists()
    with pytest.raises(UnknownTopicError):
        manager.delete_topic("clicks")
    with pytest.raises(UnknownTopicError):
        manager.topic_configs("clicks")
    manager.create_topic("clicks", 1)  # the name is free again, and the log is fresh
    assert manager.get("clicks", 0).log_end_offset == 0
    manager.close()
    assert LogManager(tmp_path / "data", config()).topics() == {"__consumer_offsets": 1, "clicks": 1}


def test_alter_configs_and_create_partitions_persist(tmp_path):
    clock = Clock(now_ms=10**12)
    manager = LogManager(tmp_path, config(segment_bytes=1024, retention_ms=1000), now_ms=clock)
    manager.create_topic("replay", 2)
    manager.alter_topic_configs("replay", {"retention.ms": "-1"})  # keep replayed history
    for _ in range(40):
        manager.get("replay", 0).append(make_batch([b"x" * 50], ts=1000))
    assert manager.enforce_retention_all() == 0
    with pytest.raises(InvalidConfigError):
        manager.alter_topic_configs("replay", {"retention.ms": "forever"})
    assert manager.topic_configs("replay") == {"retention.ms": "-1"}
    manager.create_partitions("replay", 4)
    manager.get("replay", 3).append(make_batch([b"p3"]))
    with pytest.raises(ValueError, match="n_partitions=4"):
        manager.create_partitions("replay", 4)
    with pytest.raises(UnknownTopicError):
        manager.alter_topic_configs("nope", {})
    manager.close()
    manager = LogManager(tmp_path, config(segment_bytes=1024, retention_ms=1000), now_ms=clock)
    assert manager.topics() == {"replay": 4}
    assert manager.topic_configs("replay") == {"retention.ms": "-1"}
    assert manager.get("replay", 0).config.retention_ms == -1
    assert [r[2] for r in read_all(manager.get("replay", 3))] == [b"p3"]
    assert json.loads((tmp_path / "replay" / "meta.json").read_text())["name"] == "replay"
    manager.alter_topic_configs("replay", {})  # back to the broker default: the old data expires
    assert manager.enforce_retention_all() > 0
    manager.close()


def test_data_dir_is_locked_while_a_manager_owns_it(tmp_path):
    first = LogManager(tmp_path, config())
    first.create_topic("t", 1)
    with pytest.raises(DataDirLockedError):
        LogManager(tmp_path, config())
    first.close()
    first.close()  # idempotent
    second = LogManager(tmp_path, config())
    assert second.topics() == {"t": 1}
    second.close()


def test_unreadable_topic_meta_is_reported(tmp_path):
    manager = LogManager(tmp_path, config())
    manager.create_topic("t", 2)
    manager.close()
    (tmp_path / "t" / "meta.json").write_text("{not json")
    with pytest.raises(CorruptTopicMetaError, match="meta.json"):
        LogManager(tmp_path, config())


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a b", "x" * 250, "tópico", "a~b", "a\x00"])
def test_invalid_topic_names_are_rejected(tmp_path, name):
    manager = LogManager(tmp_path, config())
    with pytest.raises(InvalidTopicError):
        manager.create_topic(name, 1)
    assert manager.topics() == {}
    assert [p.name for p in tmp_path.iterdir()] == ["~lock"]


def test_valid_edge_topic_names(tmp_path):
    manager = LogManager(tmp_path, config())
    for name in ("x" * 249, "a.b_c-D9", "...", "-"):
        manager.create_topic(name, 1)
    assert len(manager.topics()) == 4


@pytest.mark.parametrize(
    "configs",
    [{"retention.ms": "soon"}, {"segment.bytes": "10"}, {"cleanup.policy": "archive"}, {"retention.bytes": "0"}],
)
def test_invalid_topic_configs_are_rejected(tmp_path, configs):
    manager = LogManager(tmp_path, config())
    with pytest.raises(InvalidConfigError):
        manager.create_topic("t", 1, configs)
    assert manager.topics() == {} and [p.name for p in tmp_path.iterdir()] == ["~lock"]
    with pytest.raises(ValueError, match="n_partitions=0"):
        manager.create_topic("t", 0)


def test_manager_flush_policies(tmp_path):
    clock = Clock()
    manager = LogManager(tmp_path, LogConfig(fsync="interval", fsync_interval_ms=10), now_ms=clock)
    manager.create_topic("t", 2)
    manager.get("t", 0).append(make_batch([b"a"]))
    assert manager.maybe_flush_all(clock.now_ms + 10) == 1
    assert manager.maybe_flush_all(clock.now_ms + 20) == 0
    manager.get("t", 1).append(make_batch([b"a"]))
    manager.flush_all()
    assert manager.maybe_flush_all(clock.now_ms + 10**6) == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batches=st.lists(st.lists(st.binary(max_size=400), min_size=1, max_size=6), min_size=1, max_size=40),
    segment_bytes=st.integers(1024, 4096),
    index_interval_bytes=st.integers(1, 2048),
    max_bytes=st.integers(0, 3000),
)
def test_everything_appended_reads_back_in_order(tmp_path_factory, batches, segment_bytes, index_interval_bytes, max_bytes):
    directory = tmp_path_factory.mktemp("prop") / "p"
    cfg = config(segment_bytes=segment_bytes, index_interval_bytes=index_interval_bytes)
    log = PartitionLog(directory, cfg)
    expected, offset = [], 0
    for i, values in enumerate(batches):
        assert log.append(make_batch(values, ts=7 * i)) == offset
        expected.extend((offset + j, v) for j, v in enumerate(values))
        offset += len(values)
    assert [(o, v) for o, _, v, _ in read_all(log, max_bytes=max_bytes)] == expected
    log.close()
    log = PartitionLog(directory, cfg)
    assert [(o, v) for o, _, v, _ in read_all(log, max_bytes=max_bytes)] == expected
    mid = expected[len(expected) // 2][0]
    assert [(o, v) for o, _, v, _ in read_all(log, start=mid)] == expected[len(expected) // 2 :]
    log.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=25),
    cut_fraction=st.floats(0.0, 1.0),
    index_interval_bytes=st.integers(1, 1024),
    flushed_batches=st.integers(0, 25),
)
def test_any_cut_recovers_the_longest_whole_prefix(tmp_path_factory, sizes, cut_fraction, index_interval_bytes, flushed_batches):
    directory = tmp_path_factory.mktemp("cut") / "p"
    cfg = config(index_interval_bytes=index_interval_bytes)
    log = PartitionLog(directory, cfg)
    ends, offset = [], 0  # (byte end, offset end) after each batch
    for i, n in enumerate(sizes):
        offset += n
        log.append(make_batch([b"%d-%d" % (i, j) for j in range(n)]))
        ends.append((log.size_bytes, offset))
        if i + 1 == flushed_batches:
            log.flush()
    log.close()
    cut = int(cut_fraction * log.size_bytes)
    (directory / "recovery-point").write_text(str(ends[min(flushed_batches, len(ends)) - 1][1] if flushed_batches else 0))
    with open(_last_segment(directory), "r+b") as f:
        f.truncate(cut)
    log = PartitionLog(directory, cfg)
    kept = [e for e in ends if e[0] <= cut]
    want_bytes, want_offset = kept[-1] if kept else (0, 0)
    assert (log.size_bytes, log.log_end_offset) == (want_bytes, want_offset)
    assert [r[0] for r in read_all(log)] == list(range(want_offset))
    assert log.append(make_batch([b"next"])) == want_offset
    log.close()


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"segment_bytes": 1023}, "segment_bytes=1023"),
        ({"segment_bytes": 2**31}, "segment_bytes=2147483648"),
        ({"segment_ms": 0}, "segment_ms=0"),
        ({"index_interval_bytes": 0}, "index_interval_bytes=0"),
        ({"fsync": "sometimes"}, "fsync='sometimes'"),
        ({"retention_ms": 0}, "retention_ms=0"),
    ],
)
def test_log_config_rejects_bad_values(kw, message):
    with pytest.raises(ValueError, match=message):
        LogConfig(**kw)


_LIMITED_WRITER = textwrap.dedent(
    """
    import json, resource, signal, sys
    from pathlib import Path
    from streams.broker.config import LogConfig
    from streams.broker.log import PartitionLog
    from tests.broker.test_records import make_batch

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    log = PartitionLog(Path(sys.argv[1]), LogConfig(fsync="never", index_interval_bytes=1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, resource.RLIM_INFINITY))
    acked, failures = [], 0
    for i in range(40):
        try:
            acked.append((log.append(make_batch([b"%d" % i] * 3)), i))
        except OSError:
            failures += 1
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    acked.append((log.append(make_batch([b"after"] * 3)), -1))
    log.close()
    print(json.dumps({"failures": failures, "acked": acked}))
    """
)


def test_failed_write_leaves_the_log_consistent(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _LIMITED_WRITER, str(tmp_path / "p")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    result = json.loads(out)
    failures, acked = result["failures"], [tuple(a) for a in result["acked"]]
    assert failures > 0 and len(acked) > 2
    assert [offset for offset, _ in acked] == [3 * k for k in range(len(acked))]  # no gap, no reuse
    assert acked[-1][1] == -1
    log = PartitionLog(tmp_path / "p", config(index_interval_bytes=1))
    values = [r[2] for r in read_all(log)]
    assert values == [b"%d" % i if i >= 0 else b"after" for _, i in acked for _ in range(3)]


def test_one_fd_per_sealed_segment_and_none_after_close(tmp_path):
    def n_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = n_fds()
    log = PartitionLog(tmp_path / "p", config(segment_bytes=1024))
    for i in range(60):
        log.append(make_batch([b"x" * 100]))
    assert log.n_segments >= 6
    assert n_fds() - before == log.n_segments + 2  # sealed: the .log only; active: all three
    log.close()
    assert n_fds() == before
    log = PartitionLog(tmp_path / "p", config(segment_bytes=1024))
    assert n_fds() - before == log.n_segments + 2
    log.delete()
    assert n_fds() == before


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    stamps=st.lists(st.lists(st.integers(0, 10_000), min_size=1, max_size=6), min_size=1, max_size=30),
    segment_bytes=st.integers(1024, 3000),
    index_interval_bytes=st.integers(1, 1024),
    probes=st.lists(st.integers(0, 10_001), min_size=1, max_size=10),
)
def test_timestamp_lookups_match_a_scan(tmp_path_factory, stamps, segment_bytes, index_interval_bytes, probes):
    directory = tmp_path_factory.mktemp("ts") / "p"
    cfg = config(segment_bytes=segment_bytes, index_interval_bytes=index_interval_bytes)
    log = PartitionLog(directory, cfg)
    for batch_stamps in stamps:
        log.append(make_batch([b"v" * 40] * len(batch_stamps), ts=batch_stamps))
    records = read_all(log)
    top = max(t for *_, t in records)
    for reopen in (False, True):
        if reopen:
            log.close()
            log = PartitionLog(directory, cfg)
        for ts in probes:
            assert log.offset_for_timestamp(ts) == _oracle_for_timestamp(records, ts)
        assert log.max_timestamp_offset() == min((o, t) for o, _, _, t in records if t == top)
    log.close()


def test_close_releases_the_files_even_when_the_final_flush_fails(tmp_path, monkeypatch):
    log = PartitionLog(tmp_path / "p", config(fsync="interval"))
    log.append(make_batch([b"a"], ts=1))
    fds = [seg.fd for seg in log._segments]

    def failing_flush():
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(log, "flush", failing_flush)
    with pytest.raises(OSError):
        log.close()
    assert all(seg.fd == -1 for seg in log._segments)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
