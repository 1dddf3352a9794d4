"""Entry-point helpers: partitioning like Kafka, per-partition store paths, the offline builder.

:func:`build_samples` is the offline converter behind ``streamrec build-samples``: events in
event-time order (``streams.replay.iter_events``) are split by partition exactly as the replay's
producer splits them (murmur2 of the key, the decimal user_id), and each partition's events go
through its own :class:`~streams.joiner.pipeline.JoinerPipeline` on a store under ``work_dir``.
With the same partition count, the samples equal those the faust worker emits for the replayed
topics (same bytes; the order across partitions differs), except, with several partitions, the
T1/T3 bits of samples the worker judged before other partitions' statistics had arrived (they
carry a ``stats.applied`` header; docs/joiner.md, "Several workers").

>>> partition_for(712, 3), partition_for(712, 1)
(1, 0)
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kafka.partitioner.default import murmur2

from streams import StreamsError
from streams.contracts import Event
from streams.joiner.join import JoinCore
from streams.joiner.pipeline import JoinerPipeline, PipelineConfig, finish_time_ms, open_pipeline
from streams.joiner.shared import RemoteStats, StatsPublisher
from streams.samples_file import append_samples

logger = logging.getLogger(__name__)


def partition_for(user_id: int, n_partitions: int) -> int:
    """The partition Kafka's default partitioner picks for a user's events (key = decimal user_id)."""
    if n_partitions < 1:
        raise ValueError(f"n_partitions={n_partitions!r} must be >= 1")
    return (murmur2(str(user_id).encode("ascii")) & 0x7FFFFFFF) % n_partitions


def store_path(data_dir: str | Path, partition: int) -> Path:
    """Where partition ``partition``'s feature store (state + offsets) lives under ``data_dir``."""
    return Path(data_dir) / "stores" / f"p{partition:04d}"


@dataclass
class BuildSummary:
    """What an offline build did: events read, samples written, and every pipeline's counters."""

    n_events: int = 0
    n_samples: int = 0
    elapsed_s: float = 0.0
    counters: dict[str, int] = field(default_factory=dict)

    def lines(self) -> list[str]:
        c = self.counters
        rate = self.n_events / self.elapsed_s if self.elapsed_s > 0 else 0.0
        out = [f"events={self.n_events} samples={self.n_samples} elapsed_s={self.elapsed_s:.2f} "
               f"events_per_s={rate:.0f}"]
        out.append(summary_line(c))
        return out


def summary_line(c: dict[str, int]) -> str:
    """One key=value line of the counters people ask for first."""
    valid = c.get("valid_read", 0)
    clicked = c.get("clicked", 0)
    rate = lambda k: f"{c.get(k, 0) / valid:.3f}" if valid else "nan"  # noqa: E731
    return (f"samples={c.get('samples', 0)} clicked={clicked} valid_read={valid} "
            f"valid_read_rate={valid / clicked if clicked else float('nan'):.3f} "
            f"by_rule t1={rate('rule_t1')} t2={rate('rule_t2')} t3={rate('rule_t3')} "
            f"late={c.get('late', 0)} orphan={c.get('orphan', 0)} duplicate={c.get('duplicate', 0)} "
            f"dead_letter={c.get('dead_letter', 0)} pending={c.get('pending', 0)}")


def merge_counters(counters: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for c in counters:
        for k, v in c.items():
            total[k] = total.get(k, 0) + v
    return total


def _split(events: Iterable[Event], n_partitions: int, batch_events: int) -> Iterator[tuple[int, list[Event] | None]]:
    """``(partition, batch)`` as the builder feeds them, then ``(partition, None)`` per partition
    at the end of the input."""
    pending: list[list[Event]] = [[] for _ in range(n_partitions)]
    for e in events:
        p = 0 if n_partitions == 1 else partition_for(e.user_id, n_partitions)
        pending[p].append(e)
        if len(pending[p]) >= batch_events:
            yield p, pending[p]
            pending[p] = []
    for p in range(n_partitions):
        if pending[p]:
            yield p, pending[p]
        yield p, None


def shared_contributions(events: Iterable[Event], config: PipelineConfig, n_partitions: int,
                         batch_events: int = 4096) -> RemoteStats:
    """Every partition's ``joiner.dwell`` messages for ``events``, in a complete table.

    The contributions (item, dwell, click time and label epoch of each clicked sample) depend on
    the join only, not on the statistics, so a pass of the join cores gives them all; a pipeline
    reading this table sees every other partition's contributions of the epochs before its own,
    which is what a worker sees when no ``joiner.dwell`` message is late.
    """
    table = RemoteStats(n_partitions)
    epoch_ms = config.stats_epoch_ms
    cores = [JoinCore(config.joiner) for _ in range(n_partitions)]
    pubs = [StatsPublisher(p, epoch_ms) for p in range(n_partitions)]
    for p, batch in _split(events, n_partitions, batch_events):
        core, pub = cores[p], pubs[p]
        if batch is None:
            t = finish_time_ms(core)
            out = core.advance(t) if t is not None else None
        else:
            out = core.process(batch)
        for s in out.samples if out is not None else ():
            if s.clicked and s.dwell_ms >= 0:
                pub.add(s.label_ts_ms // epoch_ms, s.impression.item_id, s.dwell_ms, s.click_ts_ms)
        msg = pub.publish(core.watermark_ms)
        if msg is not None:
            table.add(msg)
    table.seal()
    return table


def build_samples(events: Iterable[Event] | Callable[[], Iterable[Event]], out_path: str | Path,
                  work_dir: str | Path, config: PipelineConfig, n_partitions: int = 1,
                  batch_events: int = 4096, progress_s: float | None = 10.0) -> BuildSummary:
    """Join ``events`` (event-time order) into a samples file (``streams.samples_file`` framing).

    ``progress_s``: log a ``build_samples_progress`` line (events, samples, rate) at most this
    often (None: never).

    ``work_dir`` receives one store per partition (it must not hold stores of another run). With
    several partitions and ``config.shared_stats`` the events are read twice (a first pass
    collects every partition's statistics contributions, :func:`shared_contributions`), so the
    samples use all contributions of earlier epochs: pass a list or a callable returning a fresh
    iterable (a one-shot iterator is read into a list).
    """
    if batch_events < 1:
        raise ValueError(f"batch_events={batch_events!r} must be >= 1")
    t0 = time.perf_counter()
    summary = BuildSummary()
    remote = None
    if config.shared_stats and n_partitions > 1:
        logger.info("build_samples_shared_stats_pass partitions=%d (the events are read twice)", n_partitions)
        if not callable(events) and iter(events) is events:
            events = list(events)
        remote = shared_contributions(events() if callable(events) else events, config, n_partitions,
                                      batch_events)
        logger.info("build_samples_shared_stats partitions=%d records=%d", n_partitions, remote.n_records)
    if callable(events):
        events = events()
    pipes: list[JoinerPipeline] = [open_pipeline(store_path(work_dir, p), p, config, remote)
                                   for p in range(n_partitions)]
    for p in pipes:
        if p.core.watermark_ms is not None:
            raise ValueError(f"work_dir={work_dir} already holds a store for partition {p.partition}")
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    next_report = None if progress_s is None else time.perf_counter() + progress_s
    try:
        with open(tmp, "wb") as fh:
            for p, batch in _split(events, n_partitions, batch_events):
                out = pipes[p].finish() if batch is None else pipes[p].process(batch)
                summary.n_events += 0 if batch is None else len(batch)
                summary.n_samples += append_samples(fh, out.samples)
                pipes[p].commit()
                if next_report is not None and (now := time.perf_counter()) >= next_report:
                    next_report = now + progress_s
                    logger.info("build_samples_progress events=%d samples=%d events_per_s=%.0f",
                                summary.n_events, summary.n_samples, summary.n_events / (now - t0))
        tmp.replace(out_path)
        summary.counters = merge_counters(p.counters() for p in pipes)
    finally:
        for p in pipes:
            p.close()
        tmp.unlink(missing_ok=True)
    summary.elapsed_s = time.perf_counter() - t0
    logger.info("build_samples_done %s", summary.lines()[0])
    return summary


class TopicLayoutError(StreamsError, ValueError):
    """The cluster's topics cannot carry the joiner's partitioning (see :func:`ensure_topics`)."""


def ensure_topics(bootstrap: str, default_partitions: int = 3) -> int:
    """Create missing event and output topics; returns the partition count (that of ``impressions``
    when it exists). Every output topic gets the event topics' partition count: the joiner writes
    partition p's outputs to partition p, so an existing one with fewer partitions is refused
    (:class:`TopicLayoutError`) before anything is consumed."""
    from kafka import KafkaAdminClient, KafkaConsumer
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from streams.contracts import EVENT_TOPICS
    from streams.joiner.changelog import TOPIC_STORE_CHANGELOG
    from streams.joiner.outputs import owned_topics

    outputs = owned_topics()  # partition p's go to partition p
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)  # metadata only
    try:
        existing = consumer.topics()

        def n_partitions(t: str) -> int:   # 0: not there
            return len(consumer.partitions_for_topic(t) or ()) if t in existing else 0

        n = n_partitions(EVENT_TOPICS[0]) or default_partitions
        for t in EVENT_TOPICS[1:]:
            other = n_partitions(t)
            if other and other != n:
                raise TopicLayoutError(f"topic {t} has {other} partitions, {EVENT_TOPICS[0]} {n}: "
                                       "the event topics must be co-partitioned")
        for t in outputs:
            found = n_partitions(t)
            if found and found < n:
                raise TopicLayoutError(f"topic {t} has {found} partitions, the event topics {n}: the joiner "
                                       f"writes partition p's outputs to partition p; add partitions "
                                       f"(kafka-topics.sh --alter --topic {t} --partitions {n}) or recreate it")
    finally:
        consumer.close()
    missing = [t for t in (*EVENT_TOPICS, *outputs) if t not in existing]
    if missing:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        compact = {TOPIC_STORE_CHANGELOG: {"cleanup.policy": "compact"}}
        try:
            admin.create_topics([NewTopic(t, num_partitions=n, replication_factor=1, topic_configs=compact.get(t, {}))
                                 for t in missing])
        except TopicAlreadyExistsError:
            pass
        finally:
            admin.close()
    return n


def run_worker(config, loglevel: str = "info") -> tuple[int, dict[str, int]]:
    """Run one faust joiner worker until SIGTERM / SIGINT; returns (exit status, final counters)."""
    import faust

    from streams.joiner.app import make_app

    n = ensure_topics(config.bootstrap)
    logger.info("joiner_start bootstrap=%s partitions=%d data_dir=%s web_port=%s", config.bootstrap, n,
                config.data_dir, config.web_port)
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    app, runtime = make_app(config)
    worker = faust.Worker(app, loglevel=loglevel, override_logging=False)
    code = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, runtime.counters()
