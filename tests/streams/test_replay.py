"""Replay into the embedded broker over TCP: counts, order, partitioning, window, pacing, resume."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from streams.contracts import EVENT_TOPICS, decode
from streams.replay import ReplayConfig, ReplayStateError, iter_events, run_replay
from streamrec.cli import main as cli_main
from tests.streams.test_sources import SLICE, SLICE_LOG, expected_counts

TOPIC_OF = {"Impression": "impressions", "Click": "clicks", "Dwell": "dwell", "Feedback": "feedback"}


def read_topics(bootstrap: str, timeout_s: float = 60.0) -> dict[tuple[str, int], list]:
    """Every event on the four topics, per (topic, partition), in offset order."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    try:
        parts = [TopicPartition(t, p) for t in EVENT_TOPICS for p in sorted(consumer.partitions_for_topic(t) or ())]
        if not parts:
            return {}
        ends = consumer.end_offsets(parts)
        consumer.assign(parts)
        consumer.seek_to_beginning()
        out: dict[tuple[str, int], list] = {(tp.topic, tp.partition): [] for tp in parts}
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            assert time.monotonic() < deadline, "topics not read back in time"
            for tp, records in consumer.poll(timeout_ms=200, max_records=5000).items():
                out[(tp.topic, tp.partition)].extend(decode(r.value) for r in records)
        return out
    finally:
        consumer.close()


def config(broker, tmp_path, paths=(SLICE_LOG,), **kw) -> ReplayConfig:
    return ReplayConfig(paths=tuple(paths), bootstrap=broker.bootstrap, state_path=tmp_path / "state.json",
                        progress=False, **kw)


def write_jsonl(path: Path, times: list[int]) -> Path:
    """One impression per time, users cycling over 0..4, ids 1..n."""
    path.write_text("".join(json.dumps({"type": "impression", "event_id": i + 1, "ts_ms": t, "user_id": i % 5,
                                        "item_id": 7, "impression_id": i + 1}) + "\n" for i, t in enumerate(times)))
    return path


class FakeClock:
    """Monotonic seconds that only move when slept; optionally raises once at the n-th reading."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.now, self.sleeps, self.calls, self.interrupt_at = 0.0, [], 0, interrupt_at

    def __call__(self) -> float:
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_slice_replay_counts_order_and_partitioning(broker, tmp_path):
    stats = run_replay(config(broker, tmp_path, partitions=3))
    expected = {TOPIC_OF[k]: v for k, v in expected_counts(SLICE_LOG).items()}
    assert stats.produced == expected and stats.complete and stats.duplicates_dropped == 288
    by_partition = read_topics(broker.bootstrap)
    assert {t: sum(len(v) for (tt, _p), v in by_partition.items() if tt == t) for t in EVENT_TOPICS} == expected
    user_partition: dict[int, int] = {}
    ids = []
    for (topic, partition), events in by_partition.items():
        assert [e.ts_ms for e in events] == sorted(e.ts_ms for e in events), (topic, partition)
        for e in events:
            assert TOPIC_OF[type(e).__name__] == topic
            assert user_partition.setdefault(e.user_id, partition) == partition  # one partition per user
            ids.append(e.event_id)
    assert len(ids) == len(set(ids)) == sum(expected.values())
    assert len({p for (_t, p) in by_partition}) == 3

    again = run_replay(config(broker, tmp_path))  # complete: a rerun produces nothing
    assert again.complete and again.n_produced == 0 and again.skipped_resumed == sum(expected.values())


def test_window_from_until(broker, tmp_path):
    all_events = list(iter_events([SLICE_LOG]))
    start, end = all_events[2000].ts_ms, all_events[4000].ts_ms
    stats = run_replay(config(broker, tmp_path, from_ms=str(start), until_ms=end))
    inside = [e for e in all_events if start <= e.ts_ms < end]
    got = sorted(e.event_id for events in read_topics(broker.bootstrap).values() for e in events)
    assert got == sorted(e.event_id for e in inside)
    before = Counter(TOPIC_OF[type(e).__name__] for e in all_events if e.ts_ms < start)
    assert stats.filtered == {t: before[t] for t in EVENT_TOPICS}


def test_pacing_speed_100_sleeps_a_hundredth_of_event_gaps(broker, tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [5_000, 6_000, 6_000, 9_000, 9_500])
    clock = FakeClock()
    stats = run_replay(config(broker, tmp_path, paths=[path], speed=100), clock=clock, sleep=clock.sleep)
    assert stats.n_produced == 5
    assert clock.sleeps == pytest.approx([0.010, 0.030, 0.005])
    assert clock.now == pytest.approx((9_500 - 5_000) / 1000 / 100)

    real_time = FakeClock()
    run_replay(config(broker, tmp_path, paths=[path], speed="1", restart=True), clock=real_time,
               sleep=real_time.sleep)
    assert real_time.sleeps == pytest.approx([1.0, 3.0, 0.5])

    as_fast = FakeClock()
    run_replay(config(broker, tmp_path, paths=[path], speed="max", restart=True), clock=as_fast,
               sleep=as_fast.sleep)
    assert as_fast.sleeps == []


def all_ids(bootstrap: str) -> Counter:
    return Counter(e.event_id for events in read_topics(bootstrap).values() for e in events)


def test_interrupted_replay_resumes_without_duplicates(broker, tmp_path):
    expected = sorted(e.event_id for e in iter_events([SLICE_LOG]))
    clock = FakeClock(interrupt_at=9_000)  # Ctrl-C part-way, raised from inside the produce loop
    with pytest.raises(KeyboardInterrupt):
        run_replay(config(broker, tmp_path, checkpoint_events=1000), clock=clock, sleep=clock.sleep)
    saved = json.loads((tmp_path / "state.json").read_text())
    (entry,) = saved["replays"].values()
    assert 0 < entry["produced"] < len(expected) and not entry["complete"]
    partial = all_ids(broker.bootstrap)
    assert sum(partial.values()) == entry["produced"]  # interruption flushed, then saved the position

    stats = run_replay(config(broker, tmp_path))
    assert stats.complete and stats.skipped_resumed == entry["produced"]
    assert stats.n_produced == len(expected) - entry["produced"]
    ids = all_ids(broker.bootstrap)
    assert sorted(ids) == expected and set(ids.values()) == {1}


def test_lost_state_write_is_reconciled_from_the_topics(broker, tmp_path):
    """Events sent after the last saved position are read back and not sent again."""
    expected = sorted(e.event_id for e in iter_events([SLICE_LOG]))
    first = run_replay(config(broker, tmp_path, max_events=5000))
    assert not first.complete and first.position == 5000
    shutil.copy(tmp_path / "state.json", tmp_path / "early.json")
    second = run_replay(config(broker, tmp_path, max_events=10_000))
    assert second.skipped_resumed == 5000 and second.position == 15_000
    shutil.copy(tmp_path / "early.json", tmp_path / "state.json")  # as if the later state writes were lost

    third = run_replay(config(broker, tmp_path, max_events=3000))  # stops inside the read-back gap
    assert (third.already_present, third.n_produced, third.position) == (3000, 0, 8000)
    fourth = run_replay(config(broker, tmp_path))
    assert fourth.complete and fourth.skipped_resumed == 8000 and fourth.already_present == 7000
    assert fourth.n_produced == len(expected) - 15_000
    ids = all_ids(broker.bootstrap)
    assert sorted(ids) == expected and set(ids.values()) == {1}


def test_state_ahead_of_topics_is_refused(broker, tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [1, 2, 3])
    run_replay(config(broker, tmp_path, paths=[path], max_events=2))
    doc = json.loads((tmp_path / "state.json").read_text())
    for entry in doc["replays"].values():
        entry["offsets"] = {k: v + 100 for k, v in entry["offsets"].items()}
    (tmp_path / "state.json").write_text(json.dumps(doc))
    with pytest.raises(ReplayStateError, match="rerun with --restart"):
        run_replay(config(broker, tmp_path, paths=[path]))
    assert run_replay(config(broker, tmp_path, paths=[path], restart=True)).n_produced == 3


def test_completed_replay_checks_the_topics_before_its_no_op(broker, tmp_path):
    """A completed replay reruns as a no-op only while the topics still hold what it wrote: a
    cluster emptied since (same address, new data) is refused, not silently left empty."""
    path = write_jsonl(tmp_path / "e.jsonl", [1, 2, 3])
    assert run_replay(config(broker, tmp_path, paths=[path])).complete
    again = run_replay(config(broker, tmp_path, paths=[path]))
    assert again.complete and again.n_produced == 0
    doc = json.loads((tmp_path / "state.json").read_text())
    (entry,) = doc["replays"].values()
    assert entry["complete"]
    kept = dict(entry["offsets"])
    entry["offsets"] = {k: v + 100 for k, v in kept.items()}  # the topics now end before it
    (tmp_path / "state.json").write_text(json.dumps(doc))
    with pytest.raises(ReplayStateError, match="rerun with --restart"):
        run_replay(config(broker, tmp_path, paths=[path]))
    entry["offsets"] = {f"gone-{k}": v + 1 for k, v in kept.items()}  # the topics no longer exist
    (tmp_path / "state.json").write_text(json.dumps(doc))
    with pytest.raises(ReplayStateError, match="do not exist"):
        run_replay(config(broker, tmp_path, paths=[path]))


def test_generic_inputs_merge_into_topics(broker, tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [10, 30])
    b = tmp_path / "b.csv"
    b.write_text("type,event_id,ts_ms,user_id,item_id,impression_id,dwell_ms,kind\n"
                 "click,101,30,1,7,2,,\n"
                 "dwell,102,40,1,7,2,900,\n"
                 "feedback,103,20,0,7,,,dislike\n")
    stats = run_replay(dataclasses.replace(config(broker, tmp_path, paths=[a, b]), progress=True))
    assert stats.produced == {"impressions": 2, "clicks": 1, "dwell": 1, "feedback": 1}
    assert stats.total == 5 and "5/5" in capsys.readouterr().err  # the bar counted the events first
    per_topic = defaultdict(list)
    for (topic, _p), events in read_topics(broker.bootstrap).items():
        per_topic[topic].extend(e.event_id for e in events)
    assert {t: sorted(v) for t, v in per_topic.items()} == {
        "impressions": [1, 2], "clicks": [101], "dwell": [102], "feedback": [103]}


def test_cli_replay(broker, tmp_path, capsys):
    path = write_jsonl(tmp_path / "e.jsonl", [1_000, 2_000, 3_000])
    toml = tmp_path / "streamrec.toml"
    toml.write_text(f'[replay]\nbootstrap = "{broker.bootstrap}"\npartitions = 2\n')
    rc = cli_main(["--config", str(toml), "replay", str(path), "--speed", "max", "--state",
                   str(tmp_path / "s.json"), "--from", "1500", "--until", "1970-01-01T00:00:03Z", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "replay topic=impressions produced=1 filtered=1" in out
    assert all_ids(broker.bootstrap) == Counter({2: 1})
    rc = cli_main(["replay", str(path), "--bootstrap", broker.bootstrap, "--speed", "fast"])
    assert rc == 2 and "speed='fast'" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError, match="speed=0 must be"):
        ReplayConfig(paths=("x",), speed=0)
    with pytest.raises(ValueError, match="until_ms=5 <= from_ms=5"):
        ReplayConfig(paths=("x",), from_ms=5, until_ms=5)
    with pytest.raises(ValueError, match="partitions=0"):
        ReplayConfig(paths=("x",), partitions=0)
    with pytest.raises(ValueError, match="names no input"):
        ReplayConfig(paths=())
    c = ReplayConfig(paths="a.jsonl", speed="max", from_ms="2022-04-25T00:00:00Z")
    assert c.paths == (Path("a.jsonl"),) and c.speed is None and c.from_ms == 1650844800000


def test_bundled_slice_directory_has_license_and_readme():
    names = {p.name for p in SLICE.iterdir()}
    assert {"README.md", "LICENSE-CC-BY-SA-4.0.txt"} <= names
    readme = (SLICE / "README.md").read_text()
    for needed in ("CC BY-SA 4.0", "10.1145/3511808.3557624", "2208.08696", "make_kuairand_slice.py",
                   "16,857", "7,476", "312"):
        assert needed in readme, needed


def _signal_at_every_line(stopper_factory, timeout_s: float = 10.0, first_only: bool = False) -> list[int]:
    """Deliver the stop signal at each Python line the pacing loop runs, one run per line: the
    handler runs where a real signal can (between two bytecodes of the main thread). Returns the
    line numbers after which the loop did not finish within ``timeout_s`` (deadlocked)."""
    import signal
    import sys
    import threading

    def pace(stopper, fire_at: int) -> None:
        seen = 0

        def tracer(frame, event, arg):
            nonlocal seen
            if event == "line":
                seen += 1
                if seen == fire_at:
                    stopper._handle(signal.SIGTERM, frame)
            return tracer

        sys.settrace(tracer)
        try:
            for _ in range(3):
                if stopper.is_set():
                    break
                stopper.sleep(0.001)
        finally:
            sys.settrace(None)

    stuck = []
    for fire_at in range(1, 80):
        stopper = stopper_factory()
        thread = threading.Thread(target=pace, args=(stopper, fire_at), daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():  # left behind, blocked for good (a daemon thread)
            stuck.append(fire_at)
            if first_only:
                break
        elif hasattr(stopper, "__exit__"):
            stopper.__exit__(None, None, None)  # the previous handlers back, the pipe closed
    return stuck


def test_stop_signal_cannot_deadlock_the_pacing_sleep():
    """The replay's signal handler runs at any point of the pacing sleep without deadlocking.

    A handler that calls ``threading.Event.set()`` hangs when the signal lands while the pacing
    ``Event.wait`` holds the event's lock (seen as a replay that ignored SIGTERM); the control
    below shows this test catches that."""
    import signal
    import threading

    from streamrec.signals import StopOnSignal

    before = signal.getsignal(signal.SIGTERM)
    assert _signal_at_every_line(lambda: StopOnSignal().__enter__()) == []
    assert signal.getsignal(signal.SIGTERM) is before

    class EventStopper:  # the pattern that deadlocked
        def __init__(self):
            self.event = threading.Event()
            self.sleep, self.is_set = self.event.wait, self.event.is_set

        def _handle(self, signum, frame):
            self.event.set()

    assert _signal_at_every_line(EventStopper, timeout_s=0.5, first_only=True)


def test_stop_signal_cuts_the_pacing_sleep_short():
    import os
    import signal
    import threading

    from streamrec.signals import StopOnSignal

    with StopOnSignal() as stopper:
        timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        started = time.monotonic()
        stopper.sleep(30)
        assert stopper.is_set() and time.monotonic() - started < 10
        with pytest.raises(KeyboardInterrupt):  # a second signal interrupts at once
            stopper._handle(signal.SIGTERM, None)
    assert signal.getsignal(signal.SIGTERM) is not stopper._handle


def test_sigterm_saves_position_and_resume_completes(broker, tmp_path):
    """A real `streamrec replay` process, paced, stopped with SIGTERM part-way, then resumed."""
    import signal
    import subprocess
    import sys

    from tests.streams.test_sources import REPO

    state = tmp_path / "state.json"
    cmd = [sys.executable, "-m", "streamrec.cli", "--log-level", "WARNING", "replay", str(SLICE_LOG),
           "--bootstrap", broker.bootstrap, "--state", str(state), "--no-progress"]
    with subprocess.Popen([*cmd, "--speed", "6000"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        try:
            deadline = time.monotonic() + 60
            while not state.exists() or sum(all_ids(broker.bootstrap).values()) < 300:  # well under way
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 130, err.decode()
        finally:
            if proc.poll() is None:
                proc.kill()
    (entry,) = json.loads(state.read_text())["replays"].values()
    assert not entry["complete"] and sum(all_ids(broker.bootstrap).values()) == entry["produced"] >= 300
    assert "interrupted=True" in out.decode()

    done = subprocess.run([*cmd, "--speed", "max"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"skipped_resumed={entry['produced']} already_present=0" in done.stdout
    ids = all_ids(broker.bootstrap)
    assert sorted(ids) == sorted(e.event_id for e in iter_events([SLICE_LOG])) and set(ids.values()) == {1}


def test_stop_signal_without_interrupt_ignores_a_second_signal_and_doctests():
    """The learner's use: a second SIGTERM does not cut the final checkpoint short."""
    import doctest
    import signal

    import streamrec.signals as signals_module
    from streamrec.signals import StopOnSignal

    assert doctest.testmod(signals_module).failed == 0
    with StopOnSignal(interrupt_on_second=False) as stopper:
        stopper._handle(signal.SIGTERM, None)
        stopper._handle(signal.SIGINT, None)  # no KeyboardInterrupt
        assert stopper.is_set() and stopper.name == "SIGTERM"
        stopper.sleep(30)  # returns at once: the stop came before
