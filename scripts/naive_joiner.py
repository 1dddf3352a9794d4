"""A naive one-event-at-a-time faust joiner: the baseline scripts/bench_joiner.py compares with.

What a first faust implementation of the joiner looks like: one agent iterating the four topics
with ``async for value in stream``, each event decoded, joined (``JoinerPipeline.process`` on a
one-event list), its outputs produced with one awaited ``send`` per record and the store committed
(state + source offsets) before the next event; faust acks each event when the iteration moves
on. It has no event-time alignment across the topics (events are joined in arrival order), no
changelog and no dead-letter routing, so its samples are not the worker's: it measures the cost of
the per-event path only. ``--null`` only counts the events (faust's per-record delivery and acks,
nothing else: the ceiling of any agent iterating a faust stream). ``/counters`` serves
``{"total": {"events": N, "samples": M}}`` and ``/progress`` the time and events count at most
every 20 ms, like the worker's pages, for the benchmark's rate reading.

    python scripts/naive_joiner.py --bootstrap HOST:PORT --data-dir DIR --web-port N [--null]
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import faust  # noqa: E402

from streams import faustfix  # noqa: E402
from streams.contracts import EVENT_TOPICS, decode  # noqa: E402
from streams.joiner.fetch import cap_fetch_wait  # noqa: E402
from streams.joiner.outputs import output_records  # noqa: E402
from streams.joiner.pipeline import PipelineConfig, open_pipeline  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bootstrap", required=True)
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--web-port", type=int, required=True)
    ap.add_argument("--null", action="store_true", help="count the events, do nothing else")
    args = ap.parse_args()
    gc.set_threshold(50_000)  # as the joiner CLI
    faustfix.install()
    app = faust.App("streamrec-naive-joiner", broker=f"kafka://{args.bootstrap}", store="memory://",
                    datadir=str(Path(args.data_dir) / "faust"), autodiscover=False, topic_replication_factor=1,
                    consumer_auto_offset_reset="earliest", stream_wait_empty=False,
                    web_enabled=True, web_port=args.web_port, web_bind="127.0.0.1", web_host="127.0.0.1")
    cap_fetch_wait(100)
    source = app.topic(*EVENT_TOPICS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    pipe = open_pipeline(Path(args.data_dir) / "store", 0, PipelineConfig())
    offsets: dict[str, int] = {}
    n = {"events": 0, "samples": 0}
    steps: list[tuple[float, int, int]] = []  # (monotonic_s, partition 0, events), every 20 ms at most

    def count() -> None:
        n["events"] += 1
        now = time.monotonic()
        if not steps or now - steps[-1][0] >= 0.02:
            steps.append((now, 0, n["events"]))

    @app.agent(source, concurrency=1)
    async def naive(stream):
        async for value in stream:
            if args.null:
                count()
                continue
            message = stream.current_event.message
            out = pipe.process([decode(value)])
            for topic, key, val, headers in output_records(message.partition, out):
                await (await app.producer.send(topic, key, val, message.partition, None, headers))
            offsets[message.topic] = message.offset + 1
            pipe.commit(offsets)
            count()
            n["samples"] += len(out.samples)

    @app.page("/counters")
    async def counters_page(web, request):
        return web.json({"total": dict(n)})

    @app.page("/progress")
    async def progress_page(web, request):
        return web.json({"monotonic_s": time.monotonic(), "steps": steps})

    @app.on_before_shutdown.connect
    async def on_shutdown(app_, **kwargs):
        pipe.close()

    faust.Worker(app, loglevel="warning", override_logging=False).execute_from_commandline()
    return 0


if __name__ == "__main__":
    sys.exit(main())
