"""Two-process tests on a real store: a writer SIGKILLed mid-stream recovers state that matches its
offsets, and a secondary reader in another process sees new commits after catch-up.

The writer runs as a child process: ``python -m tests.featurestore.test_processes MODE PATH``.
Batch ``i`` (0-based) applies ``M`` clicks and commits ``clicks/0 -> i + 1`` in the same
WriteBatch, so a store at offset ``O`` must hold exactly ``O * M`` clicks everywhere.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from featurestore import (CounterKind, FeatureReader, FeatureStoreConfig, ItemCountField,
                          RocksFeatureStore, SequenceKind)

REPO_ROOT = Path(__file__).resolve().parents[2]
M = 200           # clicks per batch
N_USERS = 20
N_ITEMS = 50
TOPIC = "clicks"
CONFIG = FeatureStoreConfig(write_buffer_bytes=256 << 10)   # small memtables: flushes happen


def apply_batch(store: RocksFeatureStore, i: int) -> None:
    with store.transaction() as tx:
        for j in range(M):
            ts = i * 1000 + j
            user, item = j % N_USERS, j % N_ITEMS
            tx.add_sequence_event(user, SequenceKind.CLICK, item_id=i * M + j, category=j % 7, ts_ms=ts)
            tx.add_user_event(user, CounterKind.CLICK, ts_ms=ts)
            tx.add_item_count(item, ItemCountField.CLICKS)
            tx.add_global_dwell(1000 + j, ts_ms=ts, shard=j % 2)
        tx.set_offset(TOPIC, 0, i + 1)


def assert_consistent(view, offset: int | None) -> None:
    """The state covers exactly ``offset`` batches."""
    n = 0 if offset is None else offset
    assert view.global_dwell_stats().n == n * M
    assert int(view.item_features(range(N_ITEMS)).clicks.sum()) == n * M
    assert sum(view.user_features(u).clicks_in_window for u in range(N_USERS)) == n * M
    info = view.commit_info()
    assert (0 if info is None else info.commit_seq) == n
    for u in (0, N_USERS - 1):
        last = view.user_features(u).click.item_ids.tolist()
        if n == 0:
            assert last == []
        else:
            last_j = max(j for j in range(M) if j % N_USERS == u)
            assert last[-1] == (n - 1) * M + last_j


# --- child process ---------------------------------------------------------------------------
def child_main(mode: str, path: str) -> None:
    store = RocksFeatureStore(path, CONFIG)
    i = store.committed_offset(TOPIC, 0) or 0
    print(f"open {i}", flush=True)
    if mode == "crash-writer":          # write until killed
        while True:
            apply_batch(store, i)
            i += 1
            print(f"committed {i}", flush=True)
    commands: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [commands.put(line.strip()) for line in sys.stdin],
                     daemon=True).start()
    while True:
        cmd = commands.get()
        if cmd == "quit":
            store.close()
            print("closed", flush=True)
            return
        if cmd == "run":                # write until "stop"
            while True:
                apply_batch(store, i)
                i += 1
                try:
                    if commands.get_nowait() == "stop":
                        break
                except queue.Empty:
                    pass
        else:
            for _ in range(int(cmd)):
                apply_batch(store, i)
                i += 1
        print(f"at {i}", flush=True)


class Child:
    """A writer child with its stdout lines on a queue, so the test can wait with a deadline."""

    def __init__(self, mode: str, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.featurestore.test_processes", mode, str(path)],
            cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        self.lines: queue.Queue[str] = queue.Queue()
        self._pump = threading.Thread(target=self._read, daemon=True)
        self._pump.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put("<eof>")

    def expect(self, prefix: str, timeout_s: float = 60.0) -> int:
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {prefix!r} line from the child within {timeout_s}s")
            line = self.lines.get(timeout=remaining)
            if line == "<eof>":
                raise AssertionError(f"child exited (rc={self.proc.wait()}) before {prefix!r}")
            if line.startswith(prefix):
                return int(line.split()[1]) if len(line.split()) > 1 else 0

    def send(self, cmd: str) -> None:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._pump.join(timeout=30)


def test_sigkill_mid_stream_recovers_state_matching_offsets(tmp_path):
    path = tmp_path / "fs"
    last_printed = 0
    for round_ in range(3):
        child = Child("crash-writer", path)
        try:
            start = child.expect("open")
            assert start >= last_printed
            printed = [start]
            while printed[-1] < start + 3 + round_:
                printed.append(child.expect("committed"))
        finally:
            child.kill()
        while not child.lines.empty():
            line = child.lines.get()
            if line.startswith("committed"):
                printed.append(int(line.split()[1]))
        last_printed = max(printed)
        with RocksFeatureStore(path, CONFIG) as store:
            offset = store.committed_offset(TOPIC, 0)
            # every printed commit survived; at most one more committed before its line was printed
            assert offset in (last_printed, last_printed + 1)
            assert_consistent(store, offset)
        last_printed = offset


def test_secondary_reader_in_another_process_sees_commits_after_catch_up(tmp_path):
    path = tmp_path / "fs"
    child = Child("stepped-writer", path)
    try:
        assert child.expect("open") == 0
        with FeatureReader(path, CONFIG) as reader:
            assert reader.committed_offset(TOPIC, 0) is None and reader.commit_info() is None
            child.send("3")
            assert child.expect("at") == 3
            assert reader.committed_offset(TOPIC, 0) is None      # nothing new before catch-up
            info = reader.refresh()
            assert info.commit_seq == 3 and reader.committed_offset(TOPIC, 0) == 3
            assert_consistent(reader, 3)

            # the writer keeps committing while the reader catches up and checks every view
            child.send("run")
            seen = set()
            deadline = time.monotonic() + 60
            while len(seen) < 3:
                assert time.monotonic() < deadline, f"reader saw only offsets {sorted(seen)}"
                reader.refresh()
                offset = reader.committed_offset(TOPIC, 0)
                assert_consistent(reader, offset)
                if offset > 3:
                    seen.add(offset)
            child.send("stop")
            final = child.expect("at")
            assert max(seen) <= final
            reader.refresh()
            assert reader.committed_offset(TOPIC, 0) == final
            assert_consistent(reader, final)
            wall = reader.commit_info().wall_ms
            reader._now_ms = lambda: wall + 250
            assert reader.staleness_ms() == 250

        with FeatureReader(path, CONFIG, mode="read_only") as ro:
            assert ro.committed_offset(TOPIC, 0) == final
            child.send("2")
            assert child.expect("at") == final + 2
            ro.refresh()
            assert ro.committed_offset(TOPIC, 0) == final + 2
            assert_consistent(ro, final + 2)
        child.send("quit")
        child.expect("closed")
    finally:
        child.kill()


def test_secondary_reader_follows_the_writer_across_a_crash_and_restart(tmp_path):
    """The learner's reader stays open while the joiner is killed and restarted."""
    path = tmp_path / "fs"
    first = Child("stepped-writer", path)
    try:
        first.expect("open")
        first.send("3")
        assert first.expect("at") == 3
        with FeatureReader(path, CONFIG) as reader:
            assert reader.committed_offset(TOPIC, 0) == 3
            first.kill()
            second = Child("stepped-writer", path)
            try:
                assert second.expect("open") == 3      # resumes at the committed offset
                second.send("30")                      # enough to flush memtables and roll files
                assert second.expect("at") == 33
                reader.refresh()
                assert reader.committed_offset(TOPIC, 0) == 33
                assert_consistent(reader, 33)
                second.send("quit")
                second.expect("closed")
            finally:
                second.kill()
    finally:
        first.kill()


def test_reader_needs_an_existing_store(tmp_path):
    from featurestore import StoreNotFoundError
    with pytest.raises(StoreNotFoundError):
        FeatureReader(tmp_path / "missing", CONFIG)


if __name__ == "__main__":
    child_main(sys.argv[1], sys.argv[2])
