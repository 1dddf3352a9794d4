"""``streamrec demo``: the main job on the embedded default (what ``make run`` runs).

1. the embedded broker starts in-process (127.0.0.1, a free port, a temporary data dir);
2. the bundled KuaiRand slice is replayed into the event topics at full speed;
3. a joiner worker (``streamrec joiner``, its own process) joins the events into samples;
4. a continuous learner (``streamrec learner``, its own process) trains on the samples topic as
   they arrive, predict-then-train, checkpointing and publishing model versions;
5. a summary: events per topic, samples, valid-read rate by rule, late / orphan / dead-letter
   counts, prequential AUC / GAUC per published version.

``--stages replay`` stops after step 2 (the per-topic summary only). ``--pipelined`` starts the
joiner and the learner before the replay, so that all three run at once, and reports the end-to-end
rate: events replayed per second from the replay's start to the learner's last trained sample
(scripts/bench_e2e.py repeats it).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from streamrec.config import build, load_section
from streamrec.logsetup import FORMAT

if TYPE_CHECKING:
    import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SLICE = REPO_ROOT / "data" / "kuairand-slice" / "log_standard_slice.csv.gz"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="the whole pipeline on the embedded broker (what `make run` runs)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice", type=Path, default=DEFAULT_SLICE, help=f"log to replay (default {DEFAULT_SLICE})")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="broker log, joiner stores, checkpoints (default: a temporary directory, removed afterwards)")
    p.add_argument("--partitions", type=int, default=3, help="partitions per topic (default 3)")
    p.add_argument("--stages", choices=("replay", "join", "all"), default="all",
                   help="replay only, replay + joiner, or everything (default)")
    p.add_argument("--model", default="dumn", help="learner backbone (default dumn)")
    p.add_argument("--objective", default="clsd", help="learner objective (default clsd)")
    p.add_argument("--batch-size", type=int, default=256, help="learner minibatch size (default 256)")
    p.add_argument("--timeout-s", type=float, default=600.0, help="give up on a stage after this long (default 600)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--pipelined", action="store_true",
                   help="start joiner and learner first and replay while they run (end-to-end events/s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.slice.exists():
        print(f"streamrec demo: input {str(args.slice)!r} does not exist", file=sys.stderr)
        return 2
    temp = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="streamrec-demo-")) if temp else args.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    rc = 1
    note = " (with the joiner's and learner's: removed at the end unless the demo fails; --data-dir keeps them)"
    with _logs_to(data_dir / "demo.log", note if temp else ""):
        try:
            rc = _run(args, data_dir)
            return rc
        finally:
            if temp and rc == 0:
                shutil.rmtree(data_dir, ignore_errors=True)
            elif temp:
                print(f"== kept for inspection: {data_dir} (logs: demo.log, joiner.log, learner.log)",
                      file=sys.stderr, flush=True)


@contextlib.contextmanager
def _logs_to(path: Path, note: str = ""):
    """The demo's own process (broker, replay, read-backs) logs to ``path``; the console keeps
    warnings and errors, between the demo's own summary lines."""
    root = logging.getLogger()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    consoles = [(h, h.level) for h in root.handlers]
    for h, level in consoles:
        h.setLevel(max(level, logging.WARNING))
    root.addHandler(handler)
    print(f"== logs: {path}{note}", flush=True)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        for h, level in consoles:
            h.setLevel(level)


def _run(args: argparse.Namespace, data_dir: Path) -> int:
    from streams.broker import EmbeddedBroker
    from streams.broker.config import BrokerConfig

    # the config file's [broker] tunes the broker (log, limits); where it runs and its data are the demo's
    broker_config = build(BrokerConfig, load_section(args.config, "broker"),
                          {"data_dir": data_dir / "broker", "port": 0, "default_partitions": args.partitions})
    with EmbeddedBroker(broker_config) as broker:
        print(f"== embedded broker on {broker.bootstrap} (data: {broker_config.data_dir})", flush=True)
        if args.pipelined and args.stages == "all":
            n_impressions, n_events = _count_input(args.slice)
            joiner = _Joiner(args, broker.bootstrap, data_dir)
            learner = _Learner(args, broker.bootstrap, data_dir, n_impressions)
            t_start = time.monotonic()
            replayed, n_bad = _replay(args, broker.bootstrap, data_dir)
            if n_bad or replayed != n_impressions:
                joiner.stop()
                learner.stop()
                print(f"   replay produced {replayed} impressions, {n_bad} undecodable; expected {n_impressions}",
                      file=sys.stderr)
                return 1
        else:
            n_impressions, n_bad = _replay(args, broker.bootstrap, data_dir)
            if args.stages == "replay" or n_bad:
                return 0 if n_bad == 0 else 1
            n_events, t_start = 0, math.nan
            joiner = _Joiner(args, broker.bootstrap, data_dir)
            learner = _Learner(args, broker.bootstrap, data_dir, n_impressions) if args.stages == "all" else None
        try:
            ok = joiner.wait_for_samples(n_impressions, args.timeout_s,
                                         learner.scrape if learner is not None else (lambda: None))
            if learner is not None:
                ok = learner.wait(args.timeout_s) and ok
        finally:
            counters = joiner.stop()
            if learner is not None:
                learner.stop()
        lines = _print_joiner_summary(counters, n_impressions)
        if learner is not None:
            versions, learner_ok = _print_learner_summary(broker.bootstrap, learner, n_impressions)
            if args.pipelined and learner.all_trained_at is not None:
                took = learner.all_trained_at - t_start
                line = (f"end to end: {n_events} events replayed -> {n_impressions} samples trained in "
                        f"{took:.1f}s from the replay's start ({n_events / took:.0f} events/s, "
                        f"{n_impressions / took:.0f} samples/s)")
                print(f"== {line}", flush=True)
                lines.append(line)
            ok = learner_ok and ok
            report = _write_report(args, broker.bootstrap, counters, versions, learner, lines)
            print(f"== report: {report}")
        return 0 if ok else 1


def _replay(args: argparse.Namespace, bootstrap: str, data_dir: Path) -> tuple[int, int]:
    from streams.replay import ReplayConfig, run_replay
    from streams.topic_summary import summarize_topics

    # [replay] may tune the replay; its input, target, pace and state are the demo's
    replay_config = build(ReplayConfig, load_section(args.config, "replay"), {
        "paths": (args.slice,), "bootstrap": bootstrap, "speed": "max", "partitions": args.partitions,
        "state_path": data_dir / "replay-state.json", "progress": not args.no_progress,
    })
    print(f"== replaying {replay_config.paths[0]} (speed=max)", flush=True)
    stats = run_replay(replay_config)
    for line in stats.summary_lines():
        print(f"   {line}")
    print("== event topics on the broker")
    t0 = time.monotonic()
    summaries = summarize_topics(bootstrap)
    for s in summaries:
        print(f"   {s.line()}")
    n_bad = sum(s.n_undecodable for s in summaries)
    print(f"== read back {sum(s.n_messages for s in summaries)} messages in "
          f"{time.monotonic() - t0:.1f}s; undecodable={n_bad}", flush=True)
    n_impressions = next((s.n_messages for s in summaries if s.topic == "impressions"), 0)
    return n_impressions, n_bad


def _count_input(path: Path) -> tuple[int, int]:
    """(impressions, events) the replay of ``path`` will produce, read from the file itself."""
    from streams.contracts import Impression
    from streams.replay import iter_events

    n_impressions = n_events = 0
    for event in iter_events([path]):
        n_events += 1
        n_impressions += isinstance(event, Impression)
    return n_impressions, n_events


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(argv: list[str], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:  # the child writes through its own copy of the descriptor
        return subprocess.Popen([sys.executable, "-m", "streamrec.cli", *argv], stdout=log,
                                stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)


def _stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class _Joiner:
    """``streamrec joiner`` as a subprocess; its counters come from its /counters page."""

    def __init__(self, args: argparse.Namespace, bootstrap: str, data_dir: Path):
        self.port = _free_port()
        self.log_path = data_dir / "joiner.log"
        argv = ["joiner", "--bootstrap", bootstrap, "--data-dir", str(data_dir / "joiner"),
                "--web-port", str(self.port), "--idle-flush-s", "3"]
        if args.config:
            argv = ["--config", str(args.config), *argv]
        print(f"== joiner: streamrec {' '.join(argv)}  (log: {self.log_path})", flush=True)
        self.proc = _spawn(argv, self.log_path)
        self.last: dict[str, int] = {}

    def counters(self) -> dict[str, int]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/counters", timeout=2) as resp:
                self.last = json.loads(resp.read())["total"]
        except (OSError, ValueError, KeyError):
            pass
        return self.last

    def wait_for_samples(self, n_impressions: int, timeout_s: float, tick=lambda: None) -> bool:
        deadline = time.monotonic() + timeout_s
        shown = -1
        while time.monotonic() < deadline:
            tick()
            if self.proc.poll() is not None:
                print(f"   joiner exited rc={self.proc.returncode}; see {self.log_path}", file=sys.stderr)
                return False
            n = self.counters().get("samples", 0)
            if n != shown:
                print(f"   joiner samples={n}/{n_impressions}", flush=True)
                shown = n
            if n >= n_impressions:
                return True
            time.sleep(1.0)
        print(f"   joiner did not emit {n_impressions} samples within {timeout_s:.0f}s", file=sys.stderr)
        return False

    def stop(self) -> dict[str, int]:
        counters = self.counters()
        _stop(self.proc)
        return counters


class _Learner:
    """``streamrec learner`` as a subprocess, trained on exactly the samples the joiner emits."""

    def __init__(self, args: argparse.Namespace, bootstrap: str, data_dir: Path, n_samples: int):
        self.log_path = data_dir / "learner.log"
        self.metrics_port = _free_port()
        argv = ["learner", "--bootstrap", bootstrap, "--checkpoint-dir", str(data_dir / "checkpoints"),
                "--model", args.model, "--objective", args.objective, "--batch-size", str(args.batch_size),
                "--max-samples", str(n_samples), "--checkpoint-every-s", "10", "--no-progress", "--cumulative-gauc",
                "--metrics-port", str(self.metrics_port)]
        if args.config:
            argv = ["--config", str(args.config), *argv]
        print(f"== learner: streamrec {' '.join(argv)}  (log: {self.log_path})", flush=True)
        self.t0 = time.monotonic()
        self.proc = _spawn(argv, self.log_path)
        self.elapsed_s = math.nan
        self.throughput: list[tuple[float, float]] = []  # (s since start, samples/s)
        self.lag: list[tuple[float, int]] = []  # (s since start, records behind, all partitions)
        self.n_samples = n_samples
        self.all_trained_at: float | None = None  # monotonic time of the first scrape showing every sample
        self.trained = 0                          # samples trained, at the last scrape

    def scrape(self) -> None:
        """One reading of the learner's Prometheus endpoint (throughput and lag for the report)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=1) as resp:
                text = resp.read().decode("utf-8", "replace")
        except OSError:
            return
        t = time.monotonic() - self.t0
        rate, lag, seen_lag = None, 0, False
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name == "streamrec_learner_samples_per_second":
                rate = float(value)
            elif name.startswith("streamrec_learner_consumer_lag{"):
                lag += int(float(value))
                seen_lag = True
            elif name == "streamrec_learner_samples_total":
                self.trained = int(float(value))
                if self.all_trained_at is None and self.trained >= self.n_samples:
                    self.all_trained_at = time.monotonic()
        if rate is not None and math.isfinite(rate):
            self.throughput.append((t, rate))
        if seen_lag:
            self.lag.append((t, lag))

    def wait(self, timeout_s: float, every_s: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout_s
        shown, next_line = -1, time.monotonic() + every_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                print(f"   learner did not finish within {timeout_s:.0f}s", file=sys.stderr)
                return False
            self.scrape()
            if time.monotonic() >= next_line and self.trained != shown:   # a line every few seconds
                print(f"   learner samples={self.trained}/{self.n_samples}", flush=True)
                shown, next_line = self.trained, time.monotonic() + every_s
            time.sleep(0.25 if self.all_trained_at is None else 1.0)
        rc = self.proc.returncode
        self.elapsed_s = time.monotonic() - self.t0
        if rc == 0 and self.all_trained_at is None:  # exited between two scrapes: its exit bounds the time
            self.all_trained_at = time.monotonic()
        if rc != 0:
            print(f"   learner exited rc={rc}; see {self.log_path}", file=sys.stderr)
        return rc == 0

    def stop(self) -> None:
        _stop(self.proc)


def _print_joiner_summary(c: dict[str, int], n_impressions: int) -> list[str]:
    from streams.joiner.worker import summary_line

    line = f"impressions={n_impressions} {summary_line(c)}"
    print("== joiner")
    print(f"   {line}", flush=True)
    return [line]


def _print_learner_summary(bootstrap: str, learner: _Learner, n_samples: int) -> tuple[list, bool]:
    from kafka import KafkaConsumer

    from learner.versions import TOPIC_MODEL_UPDATES, ModelVersion, VersionFormatError

    consumer = KafkaConsumer(TOPIC_MODEL_UPDATES, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=3000)
    versions = []
    try:
        for record in consumer:
            try:
                versions.append(ModelVersion.decode(record.value))
            except VersionFormatError:
                continue
    finally:
        consumer.close()
    print(f"== learner ({learner.elapsed_s:.1f}s)  model versions published: {len(versions)}")
    print("   prequential (each minibatch scored before it is trained on); cum = since the start,")
    print("   window = the most recent samples")
    print("   version  samples_seen  cum_auc  cum_gauc  cum_logloss  window_auc  cum_valid_read_auc")
    for v in versions:
        m = v.metrics
        print(f"   {v.version:>7}  {v.samples_seen:>12}  {_fmt(m, 'cum_click_auc')}  {_fmt(m, 'cum_click_gauc')}  "
              f"{_fmt(m, 'cum_click_logloss'):>11}  {_fmt(m, 'window_click_auc'):>10}  {_fmt(m, 'cum_vr_auc'):>18}")
    last = versions[-1].samples_seen if versions else 0
    if last < n_samples:
        print(f"   the newest version has seen {last} of {n_samples} samples", file=sys.stderr)
    return versions, bool(versions) and last >= n_samples


def _click_dwell_ms(bootstrap: str) -> "np.ndarray":
    """Dwell of every clicked sample on the samples topic (for the dwell histogram)."""
    import numpy as np
    from kafka import KafkaConsumer

    from streams.samples import TOPIC_SAMPLES, decode_batch

    consumer = KafkaConsumer(TOPIC_SAMPLES, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             enable_auto_commit=False, group_id=None, consumer_timeout_ms=3000)
    out = []
    try:
        while True:
            polled = consumer.poll(timeout_ms=2000, max_records=20_000)
            if not polled:
                break
            for records in polled.values():
                cols = decode_batch([r.value for r in records], seq_len=1)
                clicked = cols.column("clicked").astype(bool)
                dwell = cols.column("dwell_ms")[clicked]
                out.append(dwell[dwell > 0])
    finally:
        consumer.close()
    return np.concatenate(out) if out else np.zeros(0)


def _write_report(args: argparse.Namespace, bootstrap: str, counters: dict[str, int], versions: list,
                  learner: _Learner, lines: list[str]) -> Path:
    """The HTML report next to the run (or in the working directory for a temporary run)."""
    import numpy as np

    from streamrec.report import RunReport, write_report
    from streams.joiner.config import NdtConfig

    dwell = _click_dwell_ms(bootstrap)
    log_d = np.log(dwell.astype(np.float64)) if len(dwell) else np.zeros(0)
    # x_l = exp(mu - sigma) of ln(dwell) over clicks, here over the whole run (the joiner's live
    # estimate decays with a 7-day half-life, longer than the slice, so the two nearly agree)
    x_l = float(np.exp(log_d.mean() - log_d.std())) if len(log_d) > 1 else None
    ndt = NdtConfig()
    out_dir = args.data_dir if args.data_dir is not None else Path.cwd()
    path = Path(out_dir) / "streamrec-report.html"
    data = RunReport(
        title="streamrec demo: replay -> joiner -> continuous learner",
        summary_lines=lines + [f"model versions published: {len(versions)}",
                               f"learner {args.model} + {args.objective}, wall time {learner.elapsed_s:.1f}s"],
        versions=[{"version": v.version, "samples_seen": v.samples_seen, "created_at_ms": v.created_at_ms,
                   "metrics": dict(v.metrics)} for v in versions],
        joiner_counters=dict(counters), dwell_ms_of_clicks=dwell, x_l_ms=x_l,
        ndt_params=(ndt.offset_s, ndt.tau_s, ndt.a, ndt.b), throughput=learner.throughput, lag=learner.lag,
    )
    return write_report(path, data)


def _fmt(metrics: dict[str, float], name: str) -> str:
    v = metrics.get(name)
    return f"{v:8.4f}" if isinstance(v, (int, float)) and not math.isnan(v) else f"{'n/a':>8}"
