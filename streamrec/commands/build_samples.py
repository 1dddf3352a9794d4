"""``streamrec build-samples PATH... --out FILE``: historical logs -> a samples file, without Kafka.

The offline twin of ``streamrec joiner``: the same per-partition pipeline
(``streams.joiner.pipeline``) over the events of ``PATH...`` in event-time order, written as
length-prefixed ``samples`` messages (framing: ``streams/samples_file.py``), so the learner can
train before or without a broker. Settings: the ``[build-samples]`` table of ``--config``
(fields of ``streams.joiner.pipeline.PipelineConfig``, with nested ``joiner`` and ``store``
tables) under the flags below.
"""
from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
from pathlib import Path

from streamrec.config import build, load_section

GC_GEN0_THRESHOLD = 50_000


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("build-samples", help="join historical logs into a samples file (offline)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="KuaiRand log, generic JSONL/CSV, or a directory")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="samples file to write")
    p.add_argument("--partitions", type=int, default=1, metavar="N",
                   help="join as N user partitions, like a topic with N partitions (default 1); T1/T3 "
                        "use every partition's clicks of earlier epochs (shared_stats, the default) or "
                        "the partition's own (shared_stats = false)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="where the per-partition feature stores go (default: a temporary directory, removed)")
    p.add_argument("--from", dest="from_ms", default=None, metavar="TIME", help="first event time (inclusive)")
    p.add_argument("--until", dest="until_ms", default=None, metavar="TIME", help="event time to stop at (exclusive)")
    p.add_argument("--batch-events", type=int, default=4096, metavar="N", help="events per pipeline batch")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streams.joiner.pipeline import PipelineConfig
    from streams.joiner.worker import build_samples
    from streams.replay import iter_events

    gc.set_threshold(GC_GEN0_THRESHOLD)  # the join state is many small objects (docs/joiner.md, section 6)
    config = build(PipelineConfig, load_section(args.config, "build-samples"))
    temp = args.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="streamrec-build-")) if temp else args.work_dir
    try:
        def events():  # read twice with shared statistics over several partitions
            return iter_events(args.paths, from_ms=args.from_ms, until_ms=args.until_ms)
        summary = build_samples(events, args.out, work_dir, config, n_partitions=args.partitions,
                                batch_events=args.batch_events)
    except (ValueError, OSError) as exc:
        print(f"streamrec build-samples: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if temp:
            shutil.rmtree(work_dir, ignore_errors=True)
    print(f"== wrote {summary.n_samples} samples to {args.out}")
    for line in summary.lines():
        print(f"   {line}")
    return 0
