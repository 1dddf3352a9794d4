"""Throughput of the event codecs: batch vs per-message encode/decode, events/s per type, one core.

    .venv/bin/python scripts/bench_contracts.py [--n 200000] [--runs 7] [--per-message-n 20000]

Prints the machine, the exact command, and the median of ``--runs`` timings per figure.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

from benchutil import cpu_model, median_rate  # scripts/ is on sys.path when a script runs

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.contracts import (  # noqa: E402
    EVENT_TYPES,
    decode,
    decode_batch,
    encode,
    encode_batch,
    from_records,
    record_dtype,
)

# Field ranges used to draw valid events (anything not listed: 0 .. 2**31).
_RANGES = {
    "activeness": (0, 9), "age_group": (-1, 7), "kind": (1, 3), "item_category": (-1, 300),
    "user_id": (0, 30_000), "item_id": (0, 8_000_000), "dwell_ms": (0, 600_000),
    "item_duration_ms": (1_000, 600_000), "ts_ms": (1_650_000_000_000, 1_660_000_000_000),
}


def make_records(kind: type, n: int, rng: np.random.Generator) -> np.ndarray:
    dtype = record_dtype(kind)
    rec = np.empty(n, dtype=dtype)
    for name in dtype.names:
        lo, hi = _RANGES.get(name, (0, 2**31))
        if kind.__name__ == "Feedback" and name == "impression_id":
            lo = -1  # None travels as -1
        rec[name] = rng.integers(lo, hi, size=n)
    return rec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="events per batch (default 200000)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per figure; median reported")
    parser.add_argument("--per-message-n", type=int, default=20_000, help="events for per-message figures")
    parser.add_argument("--bad-fraction", type=float, default=0.01, help="garbage rows in the mixed batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pin", action="store_true", help="do not pin to CPU 0")
    args = parser.parse_args(argv)
    for name in ("n", "runs", "per_message_n"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} < 1")
    if not 0.0 <= args.bad_fraction < 1.0:
        parser.error(f"--bad-fraction={args.bad_fraction} not in [0, 1)")

    if not args.no_pin and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "n/a"
    print(f"machine: nproc={os.cpu_count()} cpu={cpu_model()!r} pinned_to={affinity}")
    print(f"python={platform.python_version()} numpy={np.__version__} n={args.n} runs={args.runs} "
          f"per_message_n={args.per_message_n} bad_fraction={args.bad_fraction}")
    header = (f"{'type':<11}{'bytes':>6}{'batch dec/s':>14}{'mixed dec/s':>14}{'batch enc/s':>14}"
              f"{'msg dec/s':>12}{'msg enc/s':>12}")
    print(header)
    rng = np.random.default_rng(args.seed)
    for kind in EVENT_TYPES:
        records = make_records(kind, args.n, rng)
        values = encode_batch(records, kind)
        mixed = list(values)
        for i in rng.choice(args.n, size=int(args.n * args.bad_fraction), replace=False):
            mixed[i] = mixed[i][:-1]
        check = decode_batch(values, kind)
        if check.errors or not np.array_equal(check.records, records):
            raise RuntimeError(f"{kind.__name__}: batch round trip mismatch")
        events = from_records(records[: args.per_message_n], kind)
        small = values[: args.per_message_n]
        m = len(small)
        batch_dec = median_rate(lambda: decode_batch(values, kind), args.n, args.runs)
        mixed_dec = median_rate(lambda: decode_batch(mixed, kind), args.n, args.runs)
        batch_enc = median_rate(lambda: encode_batch(records, kind), args.n, args.runs)
        msg_dec = median_rate(lambda: [decode(v) for v in small], m, args.runs)
        msg_enc = median_rate(lambda: [encode(e) for e in events], m, args.runs)
        print(f"{kind.__name__:<11}{len(values[0]):>6}{batch_dec:>14,.0f}{mixed_dec:>14,.0f}"
              f"{batch_enc:>14,.0f}{msg_dec:>12,.0f}{msg_enc:>12,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
