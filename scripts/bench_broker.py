"""Throughput of the embedded broker with a C client (kcat) and a Python client (kafka-python).

Starts ``streamrec broker`` in a subprocess pinned to one core, then for each client produces
``--messages`` messages of ``--size`` bytes to a fresh topic and consumes them back, ``--runs`` times.
Prints msgs/s and MB/s per client and direction (median of the runs), the exact command line, the
client commands and the machine. Clients run pinned to the other cores when there are any.

    .venv/bin/python scripts/bench_broker.py --messages 1000000 --runs 3
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import cpu_model  # scripts/ is on sys.path when a script runs

REPO_ROOT = Path(__file__).resolve().parents[1]
LISTEN_RE = re.compile(r"broker listening host=\S+ port=(\d+)")


def start_broker(data_dir: Path, core: int, partitions: int, fsync: str, log_path: Path) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, "-m", "streamrec.cli", "broker", "--port", "0", "--data-dir", str(data_dir),
           "--partitions", str(partitions), "--fsync", fsync]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"broker exited rc={proc.returncode}: {log_path.read_text()[-2000:]}")
        m = LISTEN_RE.search(log_path.read_text(errors="replace"))
        if m:
            return proc, int(m.group(1))
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("broker did not start within 60s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_affinity(broker_core: int) -> set[int] | None:
    others = os.sched_getaffinity(0) - {broker_core}
    return others or None


def kcat_produce_cmd(kcat: str, bootstrap: str, topic: str, lines_file: Path | str) -> list[str]:
    return [kcat, "-P", "-b", bootstrap, "-t", topic, "-X", "linger.ms=5", "-X", "batch.num.messages=10000",
            "-l", str(lines_file)]


def kcat_consume_cmd(kcat: str, bootstrap: str, topic: str, n: int) -> list[str]:
    return [kcat, "-C", "-b", bootstrap, "-t", topic, "-o", "beginning", "-e", "-q", "-c", str(n)]


def kcat_produce(kcat: str, bootstrap: str, topic: str, lines_file: Path, n: int, affinity) -> float:
    t0 = time.perf_counter()
    subprocess.run(kcat_produce_cmd(kcat, bootstrap, topic, lines_file), check=True, preexec_fn=_pin(affinity))
    return time.perf_counter() - t0


def kcat_consume(kcat: str, bootstrap: str, topic: str, n: int, affinity) -> float:
    cmd = kcat_consume_cmd(kcat, bootstrap, topic, n)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, preexec_fn=_pin(affinity))
    elapsed = time.perf_counter() - t0
    got = out.stdout.count(b"\n")
    if got != n:
        raise SystemExit(f"kcat consumed {got} messages, expected {n}")
    return elapsed


def _pin(affinity):
    if affinity is None:
        return None
    return lambda: os.sched_setaffinity(0, affinity)


def python_produce(bootstrap: str, topic: str, n: int, size: int) -> float:
    from kafka import KafkaProducer

    value = b"x" * size
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, batch_size=256 * 1024)
    producer.partitions_for(topic)  # metadata (and topic creation) outside the timed part
    t0 = time.perf_counter()
    for _ in range(n):
        producer.send(topic, value)
    producer.flush()
    elapsed = time.perf_counter() - t0
    producer.close()
    return elapsed


def python_consume(bootstrap: str, topic: str, n: int) -> float:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    partitions = consumer.partitions_for_topic(topic)
    consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
    got = 0
    t0 = time.perf_counter()
    deadline = time.monotonic() + 600
    while got < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=500, max_records=100_000).values():
            got += len(records)
    elapsed = time.perf_counter() - t0
    consumer.close()
    if got != n:
        raise SystemExit(f"kafka-python consumed {got} messages, expected {n}")
    return elapsed


def report(name: str, times: list[float], cpu: list[float], n: int, size: int) -> str:
    med = statistics.median(times)
    runs = ", ".join(f"{n / t:,.0f}" for t in times)
    per_cpu = n / statistics.median(cpu) if statistics.median(cpu) > 0 else float("inf")
    return (f"{name:<22} {n / med:>11,.0f} msgs/s {n * size / med / 1e6:>7.1f} MB/s "
            f"| broker {per_cpu:>11,.0f} msgs per CPU-s | runs msgs/s: {runs}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000, help="messages per run and client (default 200000)")
    parser.add_argument("--size", type=int, default=200, help="message size in bytes (default 200)")
    parser.add_argument("--runs", type=int, default=3, help="runs per client; the median is reported (default 3)")
    parser.add_argument("--partitions", type=int, default=1, help="partitions per topic (default 1)")
    parser.add_argument("--clients", default="kcat,kafka-python", help="comma list of kcat,kafka-python")
    parser.add_argument("--core", type=int, default=0, help="CPU core the broker is pinned to (default 0)")
    parser.add_argument("--fsync", default="interval", choices=("always", "interval", "never"))
    args = parser.parse_args()
    if args.messages < 1 or args.size < 1 or args.runs < 1:
        parser.error("--messages, --size and --runs must be >= 1")
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    kcat = shutil.which("kcat")
    if "kcat" in clients and kcat is None:
        print("kcat not on PATH: skipping the kcat client", file=sys.stderr)
        clients.remove("kcat")

    affinity = client_affinity(args.core)
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"machine: nproc={os.cpu_count()} cpu={cpu_model()!r} python={platform.python_version()} "
          f"kernel={platform.release()} loadavg_1m={os.getloadavg()[0]:.2f}")
    print(f"broker: pinned to core {args.core}, fsync={args.fsync}, partitions={args.partitions}; "
          f"clients on cores {sorted(affinity) if affinity else 'shared with the broker'}")
    print(f"workload: {args.messages:,} messages x {args.size} bytes, {args.runs} runs per client")

    results: dict[str, list[float]] = {}
    broker_cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-broker-") as tmp:
        tmp_path = Path(tmp)
        proc, port = start_broker(tmp_path / "data", args.core, args.partitions, args.fsync, tmp_path / "broker.log")
        bootstrap = f"127.0.0.1:{port}"

        def timed(name: str, fn, *fn_args) -> None:
            c0 = cpu_seconds(proc.pid)
            elapsed = fn(*fn_args)
            broker_cpu.setdefault(name, []).append(cpu_seconds(proc.pid) - c0)
            results.setdefault(name, []).append(elapsed)
        try:
            lines = tmp_path / "lines.txt"
            if "kcat" in clients:
                line = b"x" * args.size + b"\n"
                with open(lines, "wb") as fh:
                    for start in range(0, args.messages, 10_000):
                        fh.write(line * min(10_000, args.messages - start))
            for run in range(args.runs):
                if "kcat" in clients:
                    topic = f"bench-kcat-{run}"
                    timed("kcat produce", kcat_produce, kcat, bootstrap, topic, lines, args.messages, affinity)
                    timed("kcat consume", kcat_consume, kcat, bootstrap, topic, args.messages, affinity)
                if "kafka-python" in clients:
                    topic = f"bench-py-{run}"
                    if affinity:
                        os.sched_setaffinity(0, affinity)
                    timed("kafka-python produce", python_produce, bootstrap, topic, args.messages, args.size)
                    timed("kafka-python consume", python_consume, bootstrap, topic, args.messages)
        finally:
            proc.terminate()
            proc.wait(30)
    if "kcat" in clients:
        topic, path = "bench-kcat-<run>", "<file of N lines of --size bytes>"
        print(f"kcat produce: {shlex.join(kcat_produce_cmd(kcat, bootstrap, topic, path))}")
        print(f"kcat consume: {shlex.join(kcat_consume_cmd(kcat, bootstrap, topic, args.messages))}")
    print("kafka-python: KafkaProducer(acks=1, linger_ms=5, batch_size=262144); KafkaConsumer assign + poll")
    for name, times in results.items():
        print(report(name, times, broker_cpu[name], args.messages, args.size))
    print(f"loadavg_1m at the end: {os.getloadavg()[0]:.2f} (other work on the machine skews the figures)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
