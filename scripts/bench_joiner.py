"""Joiner benchmark: events/s of one worker on one core, window-close -> sample latency, and a naive
one-event-at-a-time agent in the same run.

The stream is the bundled slice scaled up: ``--scale K`` copies with disjoint user, event and
impression ids and the same event times (K times denser), merged in event-time order.

Phases, each on its own embedded broker with one partition per topic:

1. ``pipeline``: the per-partition pipeline in this process (no Kafka), gc gen-0 threshold 50000
   as in the joiner CLI: events/s.
2. ``worker``: the events are produced first, then ``streamrec joiner`` (``--batch-max``, default
   10000) runs as a subprocess pinned to one CPU (this process, with the broker, is not pinned);
   events/s from the last step of its progress below 10 % of the events (at the latest, when its
   first records arrived) to its first commit at >= 90 %, timed by the worker itself (its
   ``/progress`` page). ``stream``: the same with ``--delivery stream`` (faust's per-record
   stream path instead of the batch drain, ``streams/joiner/delivery.py``); the ratio batch /
   stream.
3. ``naive``: a one-event-at-a-time faust agent, ``scripts/naive_joiner.py`` (``async for`` over
   the stream, one join call, awaited sends and a store commit per event; no alignment, no
   changelog) on the first ``--naive-events`` events; the ratio worker / naive. ``null``: the same
   agent with ``--null`` (counts the events: faust's per-record delivery alone) on every event.
4. ``latency``: a fresh worker; once it holds its partition, the events are produced at
   ``--paced-rate`` events/s; per sample, latency = the sample record's timestamp - the
   timestamp of the source record whose event time moved the watermark past the sample's close
   (p50 / p99). Samples flushed at the end of the stream (no such record) are left out.

``--phases pipeline`` runs the first phase only, ``--phases latency`` the latency phase only;
``--repeat N`` runs the pipeline phase N times on fresh stores and reports the median;
``--profile PATH`` runs it once more under cProfile and writes the stats to PATH (printing the top
functions by own time).

    python scripts/bench_joiner.py --scale 8
    python scripts/bench_joiner.py --scale 2 --phases pipeline --repeat 5 --profile /tmp/joiner.prof
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from benchutil import command_line, cpu_model, load_average  # noqa: E402

from streams.broker import EmbeddedBroker  # noqa: E402
from streams.broker.config import BrokerConfig  # noqa: E402
from streams.contracts import EVENT_TOPICS, Click, Dwell, Feedback, Impression, decode, encode, key_for, topic_for  # noqa: E402
from streams.joiner.app import free_port  # noqa: E402
from streams.joiner.pipeline import PipelineConfig, open_pipeline  # noqa: E402
from streams.replay import iter_events  # noqa: E402
from streams.samples import decode as decode_sample  # noqa: E402

SLICE = REPO_ROOT / "data" / "kuairand-slice" / "log_standard_slice.csv.gz"
_RANK = {Impression: 0, Click: 1, Dwell: 2, Feedback: 3}


def scaled_events(k: int) -> list:
    base = list(iter_events([SLICE]))
    out = []
    for c in range(k):
        du, de = c * 10_000_000, c << 58
        for e in base:
            if type(e) is Impression:
                out.append((e.ts_ms, 0, c, Impression(e.event_id + de, e.ts_ms, e.user_id + du, e.item_id,
                                                       e.impression_id + de, e.activeness, e.age_group,
                                                       e.item_duration_ms, e.item_category)))
            elif type(e) is Click:
                out.append((e.ts_ms, 1, c, Click(e.event_id + de, e.ts_ms, e.impression_id + de, e.user_id + du, e.item_id)))
            elif type(e) is Dwell:
                out.append((e.ts_ms, 2, c, Dwell(e.event_id + de, e.ts_ms, e.impression_id + de, e.user_id + du,
                                                 e.item_id, e.dwell_ms)))
            else:
                imp = None if e.impression_id is None else e.impression_id + de
                out.append((e.ts_ms, 3, c, Feedback(e.event_id + de, e.ts_ms, e.user_id + du, e.item_id, e.kind, imp)))
    out.sort(key=lambda t: t[:3])
    return [t[3] for t in out]


def produce(bootstrap: str, events, rate: float | None = None) -> None:
    from kafka import KafkaProducer
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=512 * 1024, acks=1)
    t0 = time.perf_counter()
    for i, e in enumerate(events):
        if rate is not None and i % 100 == 0:
            wait = t0 + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
        producer.send(topic_for(e), key=key_for(e), value=encode(e), partition=0)
    producer.flush()
    producer.close()


def create_topics(bootstrap: str) -> None:
    from kafka.admin import KafkaAdminClient, NewTopic
    from streams.joiner.app import output_topics
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in (*EVENT_TOPICS, *output_topics())])
    admin.close()


WORKER_ARGS: list[str] = []  # --worker-arg: passed to every worker


def start_worker(bootstrap: str, data_dir: Path, port: int, batch_max: int, cpu: int | None, log: Path,
                 delivery: str = "batch"):
    cmd = [sys.executable, "-m", "streamrec.commands.joiner", "--bootstrap", bootstrap, "--data-dir", str(data_dir),
           "--web-port", str(port), "--idle-flush-s", "2", "--batch-max", str(batch_max), "--log-level", "WARNING",
           "--delivery", delivery, *WORKER_ARGS]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def start_naive(bootstrap: str, data_dir: Path, port: int, cpu: int | None, log: Path, null: bool = False):
    """scripts/naive_joiner.py: one event per await, a store commit per event (``null``: an agent
    that only counts the events)."""
    cmd = [sys.executable, str(REPO_ROOT / "scripts" / "naive_joiner.py"), "--bootstrap", bootstrap,
           "--data-dir", str(data_dir), "--web-port", str(port), *(["--null"] if null else [])]
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def counters(port: int, part: str = "total") -> dict:
    """The worker's /counters page: ``total`` or ``partitions`` (per assigned partition)."""
    try:
        return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/counters", timeout=5).read())[part]
    except OSError:
        return {}


def rate_between(port: int, n_events: int, proc, timeout_s: float) -> tuple[float, dict]:
    """events/s while the worker went from below 10 % to 90 % of ``n_events``, by its own clock:
    from its ``/progress`` page (time and events count after each commit), until it is past 90 %.

    Reads of ``/counters`` timed on this side were not reliable: the worker's event loop, which
    shares one CPU with the join thread, can answer late or not at all until the end (one run
    read 126K events/s, another got no answer between the first events and the last)."""
    deadline = time.monotonic() + timeout_s
    steps: list[tuple[float, int]] = []
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited rc={proc.returncode}")
        steps = progress(port)
        if steps and steps[-1][1] >= 0.9 * n_events:
            break
        time.sleep(0.2)
    else:
        raise RuntimeError(f"worker did not commit 90% of {n_events} events in {timeout_s}s: {steps[-1:]}")
    return rate_from_progress(steps, n_events), counters(port)


def progress(port: int) -> list[tuple[float, int]]:
    """(worker clock, events) after each recent commit, from the worker's ``/progress`` page,
    summed over its partitions ([] while it does not answer)."""
    try:
        steps = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/progress", timeout=5).read())["steps"]
    except OSError:
        return []
    last: dict[int, int] = {}
    out = []
    for t, p, n in steps:
        last[p] = n
        out.append((t, sum(last.values())))
    return out


def rate_from_progress(steps: list[tuple[float, int]], n_events: int) -> float:
    """events/s from the last step below 10 % of ``n_events`` (the first records' arrival, at the
    latest) to the first commit at >= 90 %: at least 80 % of the events, timed by the worker's
    commits (a worker on a backlog commits in few large steps: it buffers the topics until all
    four can be merged)."""
    hi = next((i for i, (_, n) in enumerate(steps) if n >= 0.9 * n_events), None)
    lo = max((i for i, (_, n) in enumerate(steps[:hi]) if n < 0.1 * n_events), default=None)
    if lo is None or hi is None:
        raise RuntimeError(f"progress {steps[:3]}...{steps[-3:]} has no step below 10% and one at 90% of "
                           f"{n_events} events (the worker keeps its last 1024 steps)")
    (t1, n1), (t2, n2) = steps[lo], steps[hi]
    return (n2 - n1) / (t2 - t1)


def stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def read_topic(bootstrap: str, topic: str):
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    end = consumer.end_offsets([tp])[tp]
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    out = []
    while consumer.position(tp) < end:
        for recs in consumer.poll(timeout_ms=500).values():
            out += recs
    consumer.close()
    return out


def latencies(bootstrap: str, lateness_ms: int) -> np.ndarray:
    """Per sample: sample record ts - record ts of the event that moved the watermark past its close."""
    src = []
    for rank, topic in enumerate(EVENT_TOPICS):
        src += [(decode(r.value).ts_ms, rank, r.offset, r.timestamp) for r in read_topic(bootstrap, topic)]
    src.sort()
    ts = np.array([s[0] for s in src], dtype=np.int64)
    wm = np.maximum.accumulate(ts) - lateness_ms  # watermark after each event, in merge order
    wall = np.array([s[3] for s in src], dtype=np.int64)
    out = []
    for r in read_topic(bootstrap, "samples"):
        close = decode_sample(r.value).label_ts_ms
        i = int(np.searchsorted(wm, close, "left"))
        if i < len(wm):
            out.append(r.timestamp - wall[i])
    return np.array(out, dtype=np.int64)


def run_pipeline(path: Path, events: list) -> tuple[float, float]:
    """``(wall s, process CPU s)`` to push ``events`` through a fresh pipeline in batches of 10K,
    one commit each. On a shared machine the CPU time is the steadier figure."""
    pipe = open_pipeline(path, 0, PipelineConfig())
    n = len(events)
    c0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(0, n, 10_000):
        pipe.process(events[i:i + 10_000])
        pipe.commit({"events": i + 10_000})
    pipe.finish()
    pipe.commit()
    dt = time.perf_counter() - t0
    dc = time.process_time() - c0
    pipe.close()
    return dt, dc


def pipeline_phase(tmp: Path, events: list, repeat: int, profile: str | None) -> None:
    n = len(events)
    rates, cpu_rates = [], []
    for r in range(repeat):
        dt, dc = run_pipeline(tmp / f"pipeline-{r}", events)
        rates.append(n / dt)
        cpu_rates.append(n / dc)
        print(f"pipeline (in process, no Kafka) run {r + 1}/{repeat}: events={n} elapsed_s={dt:.2f} "
              f"cpu_s={dc:.2f} events_per_s={n / dt:.0f} events_per_cpu_s={n / dc:.0f}")
    print(f"pipeline (in process, no Kafka): events={n} runs={repeat} "
          f"median_events_per_s={statistics.median(rates):.0f} min={min(rates):.0f} max={max(rates):.0f} "
          f"median_events_per_cpu_s={statistics.median(cpu_rates):.0f}")
    if profile:
        prof = cProfile.Profile(time.process_time)  # CPU time: steadier on a shared machine
        prof.runcall(run_pipeline, tmp / "pipeline-profile", events)
        prof.dump_stats(profile)
        print(f"profile written to {profile}; top functions by own time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def worker_phases(tmp: Path, events: list, naive_events: int, cpu: int | None) -> None:
    """The worker (batch delivery), the same worker on faust's stream path, and the naive agent,
    on pre-produced events."""
    results = {}
    # phase: (program, option, events): streamrec joiner --delivery OPTION, or naive_joiner.py (--null)
    for phase, (program, option, evs) in {"worker": ("joiner", "batch", events),
                                          "stream": ("joiner", "stream", events),
                                          "naive": ("naive", False, events[:naive_events]),
                                          "null": ("naive", True, events)}.items():
        with EmbeddedBroker(BrokerConfig(data_dir=tmp / f"broker-{phase}", port=0)) as b:
            create_topics(b.bootstrap)
            produce(b.bootstrap, evs)
            port = free_port("127.0.0.1")
            data_dir, log = tmp / f"joiner-{phase}", tmp / f"{phase}.log"
            if program == "joiner":
                proc = start_worker(b.bootstrap, data_dir, port, 10_000, cpu, log, option)
                what = f"--delivery {option} --batch-max 10000"
            else:
                proc = start_naive(b.bootstrap, data_dir, port, cpu, log, null=option)
                what = "scripts/naive_joiner.py" + (" --null" if option else "")
            try:
                rate, c = rate_between(port, len(evs), proc, 600)
            except RuntimeError:
                print(f"{phase} worker log (tail):\n{(tmp / f'{phase}.log').read_text(errors='replace')[-4000:]}")
                raise
            finally:
                stop(proc)
            results[phase] = rate
            print(f"{phase} (faust, {what}, pinned cpu={cpu}): events={len(evs)} "
                  f"events_per_s={rate:.0f} samples={c.get('samples')} late={c.get('late')} orphan={c.get('orphan')}")
    print(f"ratio worker/naive: {results['worker'] / results['naive']:.1f}x; "
          f"batch/stream delivery: {results['worker'] / results['stream']:.2f}x; "
          f"worker/null faust agent: {results['worker'] / results['null']:.2f}x")


def latency_phase(tmp: Path, events: list, paced_events: int, paced_rate: float, cpu: int | None) -> None:
    """Phase 3: a fresh worker, then events produced at ``paced_rate``; window close -> sample."""
    with EmbeddedBroker(BrokerConfig(data_dir=tmp / "broker-latency", port=0)) as b:
        create_topics(b.bootstrap)
        port = free_port("127.0.0.1")
        proc = start_worker(b.bootstrap, tmp / "joiner-latency", port, 10_000, cpu, tmp / "latency.log")
        try:
            # steady state: produce once the worker holds its partition (assigned, store open)
            t_start, deadline = time.monotonic(), time.monotonic() + 60
            while not counters(port, "partitions") and time.monotonic() < deadline:
                time.sleep(0.1)
            print("latency phase: worker holds its partition "
                  f"{time.monotonic() - t_start:.1f} s after start")
            paced = events[:paced_events]
            producer = threading.Thread(target=produce, args=(b.bootstrap, paced, paced_rate))
            t_produce = time.perf_counter()
            producer.start()
            producer.join()
            achieved = len(paced) / (time.perf_counter() - t_produce)
            print(f"latency phase: {len(paced)} events produced at {achieved:.0f} events/s "
                  f"(asked {paced_rate:.0f})")
            deadline = time.monotonic() + 120
            while counters(port).get("events", 0) < len(paced) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(3)  # the idle flush emits the rest
        finally:
            stop(proc)
        lat = latencies(b.bootstrap, PipelineConfig().joiner.allowed_lateness_ms)
        print(f"latency window close -> sample emitted (paced {paced_rate:.0f} events/s, "
              f"{len(lat)} samples closed by the watermark): p50_ms={np.percentile(lat, 50):.0f} "
              f"p99_ms={np.percentile(lat, 99):.0f} max_ms={lat.max()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=8, help="copies of the slice (default 8)")
    ap.add_argument("--paced-rate", type=float, default=5000.0, help="events/s in the latency phase")
    ap.add_argument("--paced-events", type=int, default=30_000, help="events in the latency phase")
    ap.add_argument("--naive-events", type=int, default=4000, help="events for the naive agent")
    ap.add_argument("--cpu", type=int, default=1,
                    help="CPU the worker is pinned to (-1: not pinned); the benchmark itself, with the "
                         "broker, is not pinned")
    ap.add_argument("--phases", choices=("all", "pipeline", "latency"), default="all",
                    help="all phases (default), the in-process pipeline only, or the latency phase only")
    ap.add_argument("--worker-arg", action="append", default=[],
                    help="extra `streamrec joiner` argument for the workers, e.g. --worker-arg=--batch-within-s=0.05")
    ap.add_argument("--repeat", type=int, default=1, help="runs of the pipeline phase (median reported)")
    ap.add_argument("--profile", default=None, help="write a cProfile of one more pipeline run here")
    args = ap.parse_args()
    if args.repeat < 1:
        ap.error(f"--repeat={args.repeat} must be >= 1")
    cpu = None if args.cpu < 0 else args.cpu
    WORKER_ARGS.extend(args.worker_arg)
    gc.set_threshold(50_000)  # as the joiner CLI does (docs/joiner.md, section 6)
    print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs, load average {load_average():.2f}")
    print(f"command: {command_line()}")
    events = scaled_events(args.scale)
    n = len(events)
    print(f"stream: slice x{args.scale} = {n} events")
    tmp = Path(tempfile.mkdtemp(prefix="bench-joiner-"))
    try:
        if args.phases in ("all", "pipeline"):  # 1. the pipeline alone
            pipeline_phase(tmp, events, args.repeat, args.profile)
        if args.phases == "pipeline":
            return 0
        if args.phases == "all":
            worker_phases(tmp, events, args.naive_events, cpu)
        latency_phase(tmp, events, args.paced_events, args.paced_rate, cpu)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at the end: {load_average():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
