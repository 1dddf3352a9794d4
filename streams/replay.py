"""Replay historical logs into the event topics, in event-time order, paced and resumable.

Inputs are read by :mod:`streams.sources` (KuaiRand logs: the mapping of a row to events is in
:mod:`streams.sources.kuairand`; generic JSONL/CSV: :mod:`streams.sources.generic`). All inputs
are merged on ``(ts_ms, rank, input index, seq)``: event-time order, impressions before clicks,
dwell and feedback at equal time, fully deterministic. ``from_ms`` (inclusive) and ``until_ms``
(exclusive) filter on event time; reading stops at the first event at or after ``until_ms``, so
a dwell or feedback whose time falls past ``until_ms`` is not replayed even if its impression is.

Pacing: ``speed=None`` produces as fast as possible; ``speed=s`` holds event ``e`` until
``(e.ts_ms - first.ts_ms) / s`` ms after the first event of this run was produced (1 = real time).

Producing: each event goes to ``topic_for(event)`` keyed by ``key_for(event)`` (the user id, so
all of one user's events share a partition) with an idempotent ``acks=all`` producer; the four
topics are created with ``partitions`` partitions when missing. Event time travels in the payload
(``ts_ms``); the Kafka record timestamp is the produce time, because historical timestamps would
make a broker's time-based retention delete the records as soon as they land.

Resume. The state file (JSON, default ``data/replay/state.json``, written to a temp file, fsynced
and renamed) holds, per replay key (a digest of the inputs' bytes, the options that shape the
sequence, the window and the bootstrap servers), the number of events of the sequence that are in
the topics and the end offset of every partition of the four topics, both taken right after a
producer flush in which every send was acknowledged (every ``checkpoint_events`` sends or
``checkpoint_interval_s``, at the end, and on Ctrl-C/SIGTERM or any error). A rerun skips that
prefix. Events sent after the last state write (a crash or ``kill -9`` between checkpoints, a
failed send) sit in the topics past the recorded offsets: before producing, the replay reads
exactly those records back, decodes their event ids and skips those events when it meets them.
So a resumed replay neither loses nor duplicates an event, provided nothing else writes records
with the same event ids into these topics. The state must never run ahead of the topics: if a
partition now ends before its recorded offset (the topics were deleted, or this is another
cluster), the replay stops with :class:`ReplayStateError`; ``restart=True`` (``--restart``)
forgets the position and replays everything again. A completed replay reruns as a no-op once it
has checked the same way that the topics still hold what it wrote (a cluster emptied since, at
the same address, is an error, not a silent nothing). Do not
run two replays with the same state file at the same time (the last writer wins).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from streams import StreamsError
from streams.contracts import EVENT_TOPICS, ContractError, Event, decode, encode, key_for, topic_for
from streams.sources import GenericOptions, Source, merge_sources, open_sources, parse_time_ms, window
from streams.sources.kuairand import KuaiRandOptions

logger = logging.getLogger(__name__)

DEFAULT_STATE_PATH = Path("data/replay/state.json")


class ReplayError(StreamsError):
    """A replay cannot continue (a send failed, the broker cannot be reached)."""


class ReplayStateError(ReplayError):
    """The state file disagrees with the topics; rerun with ``restart=True`` (``--restart``) to start over."""


@dataclass(frozen=True)
class ReplayConfig:
    """One replay: inputs, target cluster, pacing, event-time window, resume state."""

    paths: tuple[Path, ...]
    bootstrap: str = "127.0.0.1:9092"
    speed: float | None = None  # None = as fast as possible ("max"); 1 = real time
    from_ms: int | None = None  # event time, inclusive; ISO-8601 strings are accepted
    until_ms: int | None = None  # event time, exclusive
    partitions: int = 3  # for topics this replay creates
    replication_factor: int = 1
    state_path: Path = DEFAULT_STATE_PATH
    restart: bool = False  # ignore (and overwrite) this replay's saved position
    max_events: int | None = None  # stop after this many events of the sequence in this run
    kuairand_users: Path | None = None
    kuairand_videos: Path | None = None
    keep_duplicates: bool = False
    autoplay_dwell: bool = False
    skip_bad_lines: bool = False
    checkpoint_events: int = 20_000  # flush + save state at least every this many sends
    checkpoint_interval_s: float = 5.0  # ... and at least this often
    linger_ms: int = 20
    batch_bytes: int = 256 * 1024
    progress: bool = True  # tqdm bar on stderr (counts the events first, for the ETA)

    def __post_init__(self) -> None:
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        paths = (self.paths,) if isinstance(self.paths, (str, Path)) else self.paths
        if not paths:
            raise ValueError("paths=() names no input")
        put("paths", tuple(Path(p) for p in paths))
        speed = self.speed
        if isinstance(speed, str):
            if speed.strip().lower() == "max":
                speed = None
            else:
                try:
                    speed = float(speed)
                except ValueError:
                    raise ValueError(f"speed={self.speed!r} is neither 'max' nor a number") from None
        if speed is not None and (isinstance(speed, bool) or not speed > 0 or speed == float("inf")):
            raise ValueError(f"speed={self.speed!r} must be a finite number > 0, or 'max'")
        put("speed", None if speed is None else float(speed))
        put("from_ms", parse_time_ms(self.from_ms))
        put("until_ms", parse_time_ms(self.until_ms))
        if self.from_ms is not None and self.until_ms is not None and self.until_ms <= self.from_ms:
            raise ValueError(f"until_ms={self.until_ms} <= from_ms={self.from_ms}: the window is empty")
        for name in ("state_path", "kuairand_users", "kuairand_videos"):
            if getattr(self, name) is not None:
                put(name, Path(getattr(self, name)))
        for name, low in (("partitions", 1), ("replication_factor", 1), ("checkpoint_events", 1),
                          ("linger_ms", 0), ("batch_bytes", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}={value!r} must be an integer >= {low}")
        if self.max_events is not None and (not isinstance(self.max_events, int) or self.max_events < 0):
            raise ValueError(f"max_events={self.max_events!r} must be an integer >= 0")
        if not self.checkpoint_interval_s > 0:
            raise ValueError(f"checkpoint_interval_s={self.checkpoint_interval_s!r} must be > 0")
        if not self.bootstrap or not isinstance(self.bootstrap, str):
            raise ValueError(f"bootstrap={self.bootstrap!r} must be host:port[,host:port]")

    def kuairand_options(self) -> KuaiRandOptions:
        return KuaiRandOptions(self.kuairand_users, self.kuairand_videos, self.keep_duplicates, self.autoplay_dwell)

    def generic_options(self) -> GenericOptions:
        return GenericOptions(self.skip_bad_lines)


@dataclass
class ReplayStats:
    """What one run did. ``position`` counts events of the sequence now known to be in the topics."""

    produced: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_TOPICS, 0))
    filtered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVENT_TOPICS, 0))  # before from_ms
    skipped_resumed: int = 0  # the prefix a previous run had produced
    already_present: int = 0  # sent by a previous run after its last state write, found in the topics
    duplicates_dropped: int = 0
    bad_lines: int = 0
    position: int = 0
    total: int | None = None  # events in the sequence, when counted (progress bar)
    complete: bool = False
    interrupted: bool = False  # stopped by ``stop()`` (a signal); the position was saved
    elapsed_s: float = 0.0

    @property
    def n_produced(self) -> int:
        return sum(self.produced.values())

    @property
    def events_per_s(self) -> float:
        return self.n_produced / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary_lines(self) -> list[str]:
        lines = [f"replay topic={t} produced={self.produced[t]} filtered={self.filtered[t]}" for t in EVENT_TOPICS]
        lines.append(
            f"replay total produced={self.n_produced} skipped_resumed={self.skipped_resumed} "
            f"already_present={self.already_present} duplicates_dropped={self.duplicates_dropped} "
            f"bad_lines={self.bad_lines} position={self.position} complete={self.complete} "
            f"interrupted={self.interrupted} "
            f"elapsed_s={self.elapsed_s:.2f} events_per_s={self.events_per_s:.0f}")
        return lines


def iter_events(paths: Sequence[str | Path], *, from_ms: int | str | None = None,
                until_ms: int | str | None = None, kuairand: KuaiRandOptions | None = None,
                generic: GenericOptions | None = None, stats: ReplayStats | None = None) -> Iterator[Event]:
    """Every event of ``paths`` in event-time order within ``[from_ms, until_ms)``, without Kafka.

    >>> events = iter_events(["data/kuairand-slice"], until_ms="2022-04-24T15:10:00Z")
    >>> [type(e).__name__ for e in events]
    ['Impression', 'Click', 'Dwell', 'Impression', 'Click', 'Dwell']
    """
    sources = open_sources(paths, kuairand, generic)
    return window(merge_sources(sources), parse_time_ms(from_ms), parse_time_ms(until_ms),
                  stats.filtered if stats is not None else None)


def replay_key(config: ReplayConfig, sources: Sequence[Source]) -> str:
    """Identifies one replay in the state file: inputs, sequence-shaping options, target cluster."""
    digest = hashlib.sha256()
    for src in sources:
        digest.update(src.fingerprint().encode())
    digest.update(f"from={config.from_ms} until={config.until_ms} bootstrap={config.bootstrap}".encode())
    return digest.hexdigest()[:32]


@dataclass(frozen=True)
class ReplayState:
    """A replay's saved position: events of the sequence in the topics, and the partitions' ends."""

    produced: int = 0
    offsets: dict[str, int] = field(default_factory=dict)  # "topic:partition" -> next offset
    complete: bool = False


class StateFile:
    """The JSON state file: one entry per replay key, rewritten atomically (temp file + rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def _read(self) -> dict:
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"version": 1, "replays": {}}
        except (OSError, ValueError) as exc:
            raise ReplayStateError(f"state file {str(self.path)!r} is unreadable: {exc}") from None
        if not isinstance(doc, dict) or doc.get("version") != 1 or not isinstance(doc.get("replays"), dict):
            raise ReplayStateError(f"state file {str(self.path)!r} is not a version 1 replay state")
        return doc

    def load(self, key: str) -> ReplayState:
        entry = self._read()["replays"].get(key)
        if entry is None:
            return ReplayState()
        return ReplayState(int(entry["produced"]), {k: int(v) for k, v in entry["offsets"].items()},
                           bool(entry["complete"]))

    def save(self, key: str, state: ReplayState, config: ReplayConfig) -> None:
        doc = self._read()
        doc["replays"][key] = {"produced": state.produced, "complete": state.complete,
                               "offsets": dict(sorted(state.offsets.items())), "config": config_dict(config)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)


class _Kafka:
    """The producer, admin and consumer clients of one replay."""

    def __init__(self, config: ReplayConfig) -> None:
        from kafka import KafkaConsumer, KafkaProducer
        from kafka.errors import KafkaError

        self.config = config
        servers = config.bootstrap.split(",")
        try:
            self.producer = KafkaProducer(
                bootstrap_servers=servers, client_id="streamrec-replay", acks="all", enable_idempotence=True,
                linger_ms=config.linger_ms, batch_size=config.batch_bytes)
            self.consumer = KafkaConsumer(bootstrap_servers=servers, client_id="streamrec-replay",
                                          group_id=None, enable_auto_commit=False)
        except KafkaError as exc:
            raise ReplayError(f"cannot connect to bootstrap={config.bootstrap!r}: {exc!r}") from None
        self.futures: list = []

    def ensure_topics(self) -> dict[str, int]:
        """Create missing event topics; return every event-topic partition's end offset."""
        from kafka import KafkaAdminClient, TopicPartition
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=self.config.bootstrap.split(","), client_id="streamrec-replay")
        try:
            missing = [t for t in EVENT_TOPICS if t not in set(admin.list_topics())]
            if missing:
                try:
                    admin.create_topics([NewTopic(t, self.config.partitions, self.config.replication_factor)
                                         for t in missing], wait_for_metadata=True)
                except TopicAlreadyExistsError:
                    pass
                logger.info("replay created topics topics=%s partitions=%d", missing, self.config.partitions)
        finally:
            admin.close()
        parts = []
        for topic in EVENT_TOPICS:
            found = self._partitions_for(topic)
            parts.extend(TopicPartition(topic, p) for p in sorted(found))
        return {f"{tp.topic}:{tp.partition}": off for tp, off in self.consumer.end_offsets(parts).items()}

    def _partitions_for(self, topic: str, timeout_s: float = 30.0) -> set[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.consumer.partitions_for_topic(topic)
            if found:
                return found
            if time.monotonic() > deadline:
                raise ReplayError(f"topic {topic!r} has no partitions after {timeout_s:.0f}s")
            time.sleep(0.05)  # metadata propagation after create_topics: poll with a deadline

    def send(self, event: Event) -> str:
        topic = topic_for(event)
        self.futures.append(self.producer.send(topic, value=encode(event), key=key_for(event)))
        return topic

    def flush(self) -> dict[str, int]:
        """Wait for every send; the next offset of each partition written to. Raises on any failure."""
        self.producer.flush()
        ends: dict[str, int] = {}
        for future in self.futures:
            if not future.is_done or future.failed():
                raise ReplayError(f"send failed: {future.exception!r}")
            meta = future.value
            name = f"{meta.topic}:{meta.partition}"
            ends[name] = max(ends.get(name, 0), meta.offset + 1)
        self.futures.clear()
        return ends

    def check_not_ahead(self, offsets: dict[str, int]) -> tuple[dict, dict]:
        """``({partition: recorded offset}, {partition: end offset})``; ReplayStateError when a
        recorded partition is gone or ends before its recorded offset (see the module docstring)."""
        from kafka import TopicPartition

        parts = {}
        for name, off in offsets.items():
            topic, partition = name.rsplit(":", 1)
            parts[TopicPartition(topic, int(partition))] = off
        existing = self.consumer.topics()
        gone = sorted({tp.topic for tp, recorded in parts.items() if recorded > 0 and tp.topic not in existing})
        if gone:
            raise ReplayStateError(f"topic(s) {', '.join(gone)} do not exist but the state file records events in "
                                   "them: the topics were deleted or this is another cluster; rerun with --restart")
        ends = self.consumer.end_offsets([tp for tp in parts if tp.topic in existing])
        for tp, recorded in parts.items():
            if ends.get(tp, 0) < recorded:
                raise ReplayStateError(
                    f"{tp.topic}:{tp.partition} ends at offset {ends.get(tp)} but the state file records "
                    f"{recorded}: the topics were recreated or this is another cluster; rerun with --restart")
        return parts, ends

    def read_back_ids(self, offsets: dict[str, int], timeout_s: float = 60.0) -> set[int]:
        """Event ids of the records past ``offsets`` (what was sent after the last state write)."""
        parts, ends = self.check_not_ahead(offsets)
        todo = {tp: ends[tp] for tp, recorded in parts.items() if ends.get(tp, 0) > recorded}
        ids: set[int] = set()
        if not todo:
            return ids
        self.consumer.assign(list(todo))
        for tp in todo:
            self.consumer.seek(tp, parts[tp])
        deadline = time.monotonic() + timeout_s
        while any(self.consumer.position(tp) < end for tp, end in todo.items()):
            if time.monotonic() > deadline:
                raise ReplayError(f"reading back {sum(todo.values())} records timed out after {timeout_s:.0f}s")
            for tp, records in self.consumer.poll(timeout_ms=200).items():
                for record in records:
                    if record.offset < todo[tp]:
                        try:
                            ids.add(decode(record.value).event_id)
                        except ContractError:
                            pass  # not an event this replay wrote
        self.consumer.unsubscribe()
        return ids

    def close(self) -> None:
        self.producer.close(timeout=30)
        self.consumer.close()


def run_replay(config: ReplayConfig, *, clock: Callable[[], float] = time.monotonic,
               sleep: Callable[[float], None] = time.sleep,
               stop: Callable[[], bool] | None = None) -> ReplayStats:
    """Replay ``config.paths`` into the event topics; see the module docstring for guarantees.

    ``clock`` (seconds, monotonic) and ``sleep`` drive pacing and the checkpoint interval. When
    ``stop()`` turns true (checked before each send, e.g. set by a signal handler that also wakes
    ``sleep``), the run flushes, saves its exact position and returns with ``interrupted=True``.
    """
    from kafka.errors import KafkaError

    sources = open_sources(config.paths, config.kuairand_options(), config.generic_options())
    key = replay_key(config, sources)
    state_file = StateFile(config.state_path)
    state = ReplayState() if config.restart else state_file.load(key)
    stats = ReplayStats(skipped_resumed=state.produced, position=state.produced, complete=state.complete)
    started = clock()
    kafka = _Kafka(config)
    gap_ids: set[int] = set()
    try:
        if state.complete:   # nothing to send, if the topics still hold what was written
            if state.offsets:
                kafka.check_not_ahead(state.offsets)
            logger.info("replay already complete key=%s position=%d state=%s", key, state.produced,
                        config.state_path)
            return stats
        ends = kafka.ensure_topics()
        gap_ids = kafka.read_back_ids(state.offsets) if state.offsets else set()
        offsets = {**ends, **state.offsets}
        state_file.save(key, ReplayState(state.produced, offsets), config)
        logger.info("replay start key=%s position=%d read_back=%d speed=%s", key, state.produced,
                    len(gap_ids), config.speed or "max")
        if config.progress:
            stats.total = sum(1 for _ in iter_events(config.paths, from_ms=config.from_ms, until_ms=config.until_ms,
                                                     kuairand=config.kuairand_options(),
                                                     generic=config.generic_options()))
        run = _Run(config, kafka, lambda s: state_file.save(key, s, config), stats, offsets, clock, sleep,
                   stop or (lambda: False))
        run.produce(window(merge_sources(sources), config.from_ms, config.until_ms, stats.filtered),
                    state.produced, gap_ids, ends)
    except KafkaError as exc:
        raise ReplayError(f"kafka error while replaying to bootstrap={config.bootstrap!r}: {exc!r}") from exc
    finally:
        kafka.close()
        for src in sources:
            stats.duplicates_dropped += src.counters.duplicates_dropped
            stats.bad_lines += src.counters.bad_lines
        stats.elapsed_s = max(clock() - started, 0.0)
    if gap_ids:  # e.g. events of the gap that lie before the resume point, or another producer's
        logger.info("replay read back ids not met after the resume point n=%d", len(gap_ids))
    logger.info("replay %s key=%s position=%d produced=%d",
                "complete" if stats.complete else "interrupted" if stats.interrupted else "stopped",
                key, stats.position, stats.n_produced)
    return stats


@dataclass
class _Run:
    """The produce loop of one run: pacing, sends, checkpoints (flush, then save the position)."""

    config: ReplayConfig
    kafka: _Kafka
    save: Callable[[ReplayState], None]
    stats: ReplayStats
    offsets: dict[str, int]
    clock: Callable[[], float]
    sleep: Callable[[float], None]
    stop: Callable[[], bool]

    def checkpoint(self, complete: bool = False) -> None:
        self.offsets.update(self.kafka.flush())  # raises ReplayError when a send failed: state stays behind
        self.save(ReplayState(self.stats.position, dict(self.offsets), complete))

    def produce(self, events: Iterator[Event], skip: int, gap_ids: set[int], ends: dict[str, int]) -> None:
        config, stats, clock = self.config, self.stats, self.clock
        bar = _progress_bar(config, stats)
        base: tuple[float, int] | None = None
        last_checkpoint, since_checkpoint = clock(), 0
        stop_at = None if config.max_events is None else skip + config.max_events
        try:
            for index, event in enumerate(events):
                if index < skip:
                    continue
                if stop_at is not None and index >= stop_at:
                    break
                if gap_ids and event.event_id in gap_ids:
                    gap_ids.discard(event.event_id)
                    stats.already_present += 1
                    stats.position = index + 1
                    if not gap_ids:  # every read-back event met: later resumes need not re-read them
                        self.offsets.update({k: max(v, self.offsets.get(k, 0)) for k, v in ends.items()})
                    continue
                if config.speed is not None:
                    if base is None:
                        base = (clock(), event.ts_ms)
                    delay = base[0] + (event.ts_ms - base[1]) / 1000.0 / config.speed - clock()
                    if delay > 0:
                        self.sleep(delay)
                if self.stop():
                    stats.interrupted = True
                    break
                stats.produced[self.kafka.send(event)] += 1
                stats.position = index + 1
                since_checkpoint += 1
                if bar is not None and since_checkpoint % 256 == 0:
                    bar.update(stats.position - bar.n)
                now = clock()
                due = now - last_checkpoint >= config.checkpoint_interval_s
                if due or since_checkpoint >= config.checkpoint_events:
                    self.checkpoint()
                    last_checkpoint, since_checkpoint = now, 0
            else:
                stats.complete = True
            self.checkpoint(complete=stats.complete)
        except BaseException:
            try:
                self.checkpoint()
            except Exception as exc:  # the original exception propagates; the next run reads back
                logger.error("replay could not save its position position=%d error=%r", stats.position, exc)
            else:
                logger.info("replay interrupted; position saved position=%d", stats.position)
            raise
        finally:
            if bar is not None:
                bar.update(stats.position - bar.n)
                bar.close()


def _progress_bar(config: ReplayConfig, stats: ReplayStats):  # -> tqdm | None
    if not config.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=stats.total, initial=stats.position, unit="ev", unit_scale=(stats.total or 0) >= 10_000,
                desc="replay", dynamic_ncols=True, smoothing=0.1)


def config_dict(config: ReplayConfig) -> dict:
    """``dataclasses.asdict(config)`` with paths as strings (what the state file records)."""
    return {k: [str(p) for p in v] if k == "paths" else str(v) if isinstance(v, Path) else v
            for k, v in dataclasses.asdict(config).items()}
