"""Throughput of the sample codec and the join core on one core.

    .venv/bin/python scripts/bench_samples.py [--n 32768] [--batch 4096] [--runs 7] [--profile mixed]
                                              [--events 200000] [--seq-len 100]

Prints the machine, the exact command, and medians of ``--runs`` timings:

* ``decode_batch`` samples/s (zero-padded and unpadded (B, T) matrices) and per-message decode/s;
* per-message encode/s;
* join core events/s (with the default gc thresholds and with gen-0 threshold 50000) on a synthetic stream (30 % clicked, a dwell per click, 5 % liked, arrival
  shuffled within the allowed lateness, 2 % duplicates), and labelling (valid read + NDT +
  Sample construction) + encode samples/s with constant statistics.

Allocator: each decode_batch call returns fresh (B, T) matrices (tens of MB per batch of 4096).
With glibc defaults, large blocks are mmap-ed and the heap top is trimmed when they are freed, so
every batch pays page faults for its output; a consumer process that sets
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` (e.g. to 4294967296) keeps that memory
warm; ``--keep-freed-memory`` applies in-process the setting ``streamrec learner`` and
``train-offline`` use (``streamrec/alloc.py``). The machine line shows which; run the script both
ways to compare.

Sequence-length profiles (click, unclick, like, dislike): ``full`` = all T; ``mixed`` = uniform
0..T, T, uniform 0..10, uniform 0..3 (an active user: the unclick history is always full);
``short`` = uniform 0..10 each.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import sys
from pathlib import Path

from benchutil import cpu_model, median_rate  # scripts/ is on sys.path when a script runs

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streams.contracts import Click, Dwell, Feedback, FeedbackKind, Impression  # noqa: E402
from streams.joiner import JoinCore, JoinerConfig, label_batch  # noqa: E402
from streams.samples import SEQUENCE_KINDS, Sample, Snapshot, decode, decode_batch, encode  # noqa: E402

T0 = 1_650_000_000_000


def pin_one_core() -> str:
    if hasattr(os, "sched_setaffinity"):
        core = sorted(os.sched_getaffinity(0))[0]
        os.sched_setaffinity(0, {core})
        return f"pinned to core {core}"
    return "not pinned (no sched_setaffinity)"


def lengths(profile: str, t: int, rng: np.random.Generator) -> list[int]:
    if profile == "full":
        return [t, t, t, t]
    if profile == "short":
        return [int(x) for x in rng.integers(0, 11, 4)]
    return [int(rng.integers(0, t + 1)), t, int(rng.integers(0, 11)), int(rng.integers(0, 4))]


def make_samples(n: int, profile: str, t: int, rng: np.random.Generator) -> list[Sample]:
    out = []
    for i in range(n):
        kw = {}
        for kind, m in zip(SEQUENCE_KINDS, lengths(profile, t, rng)):
            kw[f"{kind}_items"] = tuple(rng.integers(0, 8_000_000, m).tolist())
            kw[f"{kind}_cats"] = tuple(rng.integers(0, 300, m).tolist())
        ts = T0 + i * 50
        clicked = bool(rng.random() < 0.3)
        out.append(Sample(
            impression_id=i, ts_ms=ts, user_id=int(rng.integers(0, 30_000)), item_id=int(rng.integers(0, 8_000_000)),
            label_ts_ms=ts + 1_800_000, activeness=int(rng.integers(0, 9)), item_duration_ms=60_000,
            item_category=int(rng.integers(0, 300)), user_group=3, clicked=clicked,
            dwell_ms=int(rng.integers(0, 300_000)) if clicked else -1, valid_read=clicked, rules=9 if clicked else 0,
            ndt_weight=0.5 if clicked else 0.0, snapshot=Snapshot(**kw, newest_ts_ms=ts - 1)))
    return out


def make_stream(n_events: int, cfg: JoinerConfig, rng: np.random.Generator) -> list:
    events, ids, k, ts = [], 0, 0, T0
    while len(events) < n_events:
        ts += int(rng.integers(0, 200))  # ~10 impressions/s: the stream spans several label windows
        user, item = int(rng.integers(0, 30_000)), int(rng.integers(0, 1_000_000))
        ids += 1
        events.append(Impression(ids, ts, user, item, k, activeness=3, item_category=5))
        if rng.random() < 0.3:
            dwell = int(rng.integers(0, 120_000))
            events.append(Click(ids + 1, ts + 200, k, user, item))
            events.append(Dwell(ids + 2, ts + 200 + dwell, k, user, item, dwell))
            if rng.random() < 0.17:
                events.append(Feedback(ids + 3, ts + 200 + dwell, user, item, FeedbackKind.LIKE, k))
            ids += 3
        k += 1
    events.sort(key=lambda e: e.ts_ms)
    dups = [events[i] for i in rng.integers(0, len(events), len(events) // 50)]
    allev = events + dups
    jitter = rng.integers(0, cfg.allowed_lateness_ms + 1, len(allev))
    order = np.lexsort((np.arange(len(allev)), np.array([e.ts_ms for e in allev]) + jitter))
    return [allev[i] for i in order]


class ConstantStats:
    def ln_dwell_ms_moments(self):
        return 10.3, 1.2

    def item_dwell_quantile_ms(self, item_id, quantile):
        return 6_000.0

    def user_clicks_7d(self, user_id, ts_ms):
        return 12


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=32_768, help="samples encoded for the decode figures")
    ap.add_argument("--batch", type=int, default=4_096, help="samples per decode_batch call")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--profile", choices=("full", "mixed", "short"), default="mixed")
    ap.add_argument("--seq-len", type=int, default=100)
    ap.add_argument("--events", type=int, default=200_000, help="events in the join-core stream")
    ap.add_argument("--join-batch", type=int, default=1_000, help="events per JoinCore.process call")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="apply the allocator setting of `streamrec learner` / `train-offline` first "
                         "(streamrec/alloc.py)")
    args = ap.parse_args(argv)

    malloc = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_")) or "glibc defaults"
    if args.keep_freed_memory:
        from streamrec.alloc import keep_freed_memory
        malloc = f"streamrec.alloc: {keep_freed_memory()}"
    print(f"machine: {cpu_model()} | {os.cpu_count()} cpus | {pin_one_core()} | python {platform.python_version()}"
          f" | numpy {np.__version__} | malloc: {malloc} | load avg {os.getloadavg()[0]:.1f}")
    env = " ".join(f"{k}={v}" for k, v in os.environ.items() if k.startswith("MALLOC_"))
    print(f"command: {(env + ' ') if env else ''}{shlex.join([sys.executable, *sys.argv])}")
    rng = np.random.default_rng(0)
    samples = make_samples(args.n, args.profile, args.seq_len, rng)
    values = [encode(s) for s in samples]
    batches = [values[i:i + args.batch] for i in range(0, len(values), args.batch)]
    mean_bytes = sum(map(len, values)) / len(values)
    print(f"samples: n={len(values)} profile={args.profile} T={args.seq_len} mean_bytes={mean_bytes:.0f} "
          f"batch={args.batch}")
    for zero in (True, False):
        rate = median_rate(lambda: [decode_batch(b, args.seq_len, zero_padding=zero) for b in batches],
                           len(values), args.runs)
        print(f"decode_batch zero_padding={zero}: {rate:,.0f} samples/s ({rate * mean_bytes / 1e6:,.0f} MB/s)")
    few = values[:4_096]
    print(f"decode per message: {median_rate(lambda: [decode(v) for v in few], len(few), args.runs):,.0f} samples/s")
    print(f"encode per message: {median_rate(lambda: [encode(s) for s in samples[:4_096]], 4_096, args.runs):,.0f}"
          " samples/s")

    cfg = JoinerConfig()
    stream = make_stream(args.events, cfg, rng)

    def join_all():
        core = JoinCore(cfg)
        out = []
        for i in range(0, len(stream), args.join_batch):
            out.extend(core.process(stream[i:i + args.join_batch]).samples)
        out.extend(core.flush().samples)
        return out

    joined = join_all()
    default_gc = gc.get_threshold()
    for threshold in (default_gc, (50_000, 20, 100)):  # the join state is many small objects
        gc.set_threshold(*threshold)
        rate = median_rate(join_all, len(stream), max(3, args.runs // 2))
        print(f"join core: {len(stream):,} events ({len(joined):,} samples): {rate:,.0f} events/s "
              f"(batch={args.join_batch}, gc threshold {threshold})")
    gc.set_threshold(*default_gc)
    part = joined[:20_000]
    snaps = [Snapshot()] * len(part)
    stats = ConstantStats()
    rate = median_rate(lambda: label_batch(part, snaps, stats, cfg), len(part),
                       max(3, args.runs // 2))
    print(f"label_batch (valid read + NDT + encode, empty snapshots): {rate:,.0f} samples/s")


if __name__ == "__main__":
    main()
