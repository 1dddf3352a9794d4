"""End-to-end rate: replay -> broker -> joiner -> learner, all running at once.

Runs ``streamrec demo --pipelined`` (embedded broker in the demo's process, joiner and learner as
their own processes, started before the replay) ``--runs`` times and prints, per run and as the
median, the events replayed per second from the replay's start to the moment the learner's
Prometheus endpoint shows every sample trained (read every 0.25 s; if the learner exits between
two readings, its exit time is used). Process start-up (faust, torch imports) overlaps the replay
and is part of the figure, as it is for a user running the job.

    .venv/bin/python scripts/bench_e2e.py --model wide_deep --objective bce --runs 3
    .venv/bin/python scripts/bench_e2e.py --slice ../shared/data/kuairand-pure/log_standard_4_25_to_5_08_pure.csv.gz \\
        --model wide_deep --objective bce --runs 1
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchutil import command_line, cpu_model, load_average  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"end to end: (\d+) events replayed -> (\d+) samples trained in ([\d.]+)s .*?"
                  r"\((\d+) events/s, (\d+) samples/s\)")


def one_run(args: argparse.Namespace, run: int) -> tuple[int, int, float]:
    with tempfile.TemporaryDirectory(prefix="streamrec-bench-e2e-") as tmp:
        cmd = [sys.executable, "-m", "streamrec.cli", "--log-level", "WARNING", "demo", "--pipelined",
               "--no-progress", "--data-dir", tmp, "--model", args.model, "--objective", args.objective,
               "--batch-size", str(args.batch_size), "--partitions", str(args.partitions),
               "--timeout-s", str(args.timeout_s)]
        if args.slice:
            cmd += ["--slice", str(args.slice)]
        t0 = time.monotonic()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        m = LINE.search(done.stdout)
        if done.returncode != 0 or m is None:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
            raise SystemExit(f"run {run}: demo failed (rc={done.returncode})")
        events, samples, took = int(m.group(1)), int(m.group(2)), float(m.group(3))
        print(f"run {run}: {events} events -> {samples} samples trained in {took:.1f}s "
              f"({events / took:,.0f} events/s, {samples / took:,.0f} samples/s; whole command "
              f"{time.monotonic() - t0:.1f}s, load average {load_average():.1f})", flush=True)
        return events, samples, took


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slice", type=Path, default=None, help="log to replay (default: the bundled slice)")
    p.add_argument("--model", default="dumn")
    p.add_argument("--objective", default="clsd")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=1800.0)
    args = p.parse_args()
    print(f"machine: {cpu_model()}, load average {load_average():.1f}")
    print(f"command: {command_line()}")
    results = [one_run(args, i + 1) for i in range(args.runs)]
    events, samples = results[0][0], results[0][1]
    took = statistics.median(r[2] for r in results)
    print(f"median over {args.runs} run(s): {events} events -> {samples} samples in {took:.1f}s = "
          f"{events / took:,.0f} events/s end to end ({samples / took:,.0f} samples/s), "
          f"{args.model} + {args.objective}, B = {args.batch_size}, {args.partitions} partitions")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
