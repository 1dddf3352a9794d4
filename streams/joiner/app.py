"""The faust app: the four event topics -> one :class:`JoinerPipeline` per partition -> ``samples``.

Topology (docs/joiner.md, "Running the joiner")::

    impressions ─┐                    one agent, co-partitioned: partition p of all four topics
    clicks ──────┼─ BatchDrain ─> decode (bad -> <topic>.dlq) ─> TopicAligner[p] ─> JoinerPipeline[p]
    dwell ───────┤                                                       │   (store data_dir/stores/p)
    feedback ────┘                 samples[p], <topic>.late[p], joiner.orphans[p] <─┤
    joiner.dwell (all partitions) ─> StatsFeed thread ─> RemoteStats ─> (T1/T3)     │
    joiner.dwell[p] <── this partition's statistics contributions, per epoch ────────┘

faust's consumer hands each fetch of the four topics to the joiner's task as one list
(``streams.joiner.delivery.BatchDrain``: faust's per-record stream path is bypassed, measured
there); the task is thin: it hands the records to :class:`JoinerRuntime.handle`, which decodes,
aligns, runs the pipelines, produces the outputs (to the source's partition), then commits each
pipeline (state + join-core records + source offsets + output end offsets: one WriteBatch)
and only then returns the consumed records to ack, so the group's committed offsets never pass the
store's. A timer releases aligned events when topics catch up, flushes partitions idle for
``idle_flush_s`` and logs the counters; ``/counters`` on the web port returns them as JSON,
``/progress`` the time and events count after each recent commit (:attr:`JoinerRuntime.progress`).
Output topics, records and the produce calls live in ``streams.joiner.outputs``.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faust

from featurestore import keys as fs_keys
from streams import faustfix
from streams.contracts import EVENT_TOPICS, decode_batch, from_records, kind_of
from streams.joiner.changelog import CHANGELOG_NEXT_META, ChangelogCompacted, make_tag, read_changelog
from streams.joiner.delivery import BatchDrain
from streams.joiner.fetch import cap_fetch_wait
from streams.joiner.outputs import (SEND_BATCH_BYTES, TOPIC_ORPHANS, Record, batch_sender, dead_letter_record,  # noqa: F401
                                    late_topic, output_records, output_topics, owned_topics, produce,
                                    produce_changelog)
from streams.joiner.pipeline import JoinerPipeline, PipelineConfig, PipelineOutput, open_pipeline
from streams.joiner.readback import PartitionReader
from streams.joiner.shared import RemoteStats
from streams.joiner.state import Entry, OutputLedger, TopicAligner
from streams.joiner.worker import merge_counters, store_path, summary_line

logger = logging.getLogger(__name__)

PROGRESS_STEPS = 1024  # commits kept in JoinerRuntime.progress


@dataclass(frozen=True)
class JoinerAppConfig:
    """One joiner worker. ``data_dir`` holds one feature store per partition (``stores/pNNNN``),
    shared by the workers of one host; ``web_port`` None disables faust's web server.
    ``changelog``: produce every store commit to ``joiner-store-changelog`` and restore a missing
    or older store from it (``streams.joiner.changelog``). ``fetch_max_wait_ms``: the longest a
    fetch long-polls (faust's own 1500 ms is overridden: ``streams.joiner.fetch``). ``delivery``:
    ``batch`` (default) hands each fetch to the joiner as one list (``streams.joiner.delivery``);
    ``stream`` uses faust's per-record stream path (an agent over ``noack_take``), for comparison."""

    bootstrap: str = "127.0.0.1:9092"
    data_dir: Path = Path("data/joiner")
    app_id: str = "streamrec-joiner"
    web_host: str = "127.0.0.1"
    web_port: int | None = None
    batch_max: int = 10_000
    tick_s: float = 0.2
    idle_flush_s: float | None = None
    log_every_s: float = 10.0
    store_lock_wait_s: float = 30.0
    session_timeout_s: float = 10.0
    fetch_max_wait_ms: int = 100
    delivery: str = "batch"
    changelog: bool = True
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.batch_max < 1:
            raise ValueError(f"batch_max={self.batch_max!r} must be >= 1")
        if self.delivery not in ("batch", "stream"):
            raise ValueError(f"delivery={self.delivery!r} must be 'batch' or 'stream'")
        if not 0 <= self.fetch_max_wait_ms <= 60_000:
            raise ValueError(f"fetch_max_wait_ms={self.fetch_max_wait_ms!r} must be in [0, 60000]")
        for name in ("tick_s", "log_every_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.idle_flush_s is not None and not self.idle_flush_s > 0:
            raise ValueError(f"idle_flush_s={self.idle_flush_s!r} must be > 0 or None")
        if self.web_port is not None and not 0 <= self.web_port <= 65535:
            raise ValueError(f"web_port={self.web_port!r} must be in [0, 65535] or None")


HOLE_CHECK_S = 5.0  # an idle partition's topics are checked for trailing offsets without records this often


class _Partition:
    def __init__(self, pipeline: JoinerPipeline, aligner: TopicAligner, ledger: OutputLedger) -> None:
        self.pipeline, self.aligner, self.ledger = pipeline, aligner, ledger
        self.writer_id = random.getrandbits(63)  # tags this owner's changelog batches
        self.last_event_s = time.monotonic()
        self.flushed = False
        self.received = False  # records arrived since the partition was opened here
        self.hole_checked_s = time.monotonic()


class JoinerRuntime:
    """Everything the agent and the timer do, per assigned partition (see the module docstring).

    ``send(topic, key, value, partition, headers)`` is an async producer call returning an
    awaitable of record metadata, ``send_many`` (optional) its batched form
    (``streams.joiner.outputs.produce``); ``read_back(topic, partition, from_offset)`` returns the values
    in the topic from that offset (used once per partition on assignment); ``caught_up(topic,
    partition, next_offset)`` says the consumer holds everything the broker has. ``remote``: the
    other partitions' statistics (``joiner.dwell``), ``extra_counters()`` the feed's counters;
    ``reread()`` (async) empties ``remote`` and reads the topic again. ``first_offset(topic,
    partition, offset)`` (blocking, optional) is the offset of the first record at or after
    ``offset`` (``PartitionReader.first_offset``): on an offset gap it tells records the consumer
    skipped (seek back to them) from offsets that hold none (retention, compaction, transaction
    markers: skip them, counted in ``source_offsets_skipped``, logged ``source_offsets_missing``).

    The table is pruned on every tick: per source partition q, the epochs below what every held
    partition's committed state still needs of q (when q is the only partition held: below the
    oldest epoch it needs of any source; nothing while no partition is held). A partition
    assigned later whose committed state needs pruned epochs makes the worker ``reread`` first
    (logged as ``stats_reread``; counter ``stats_feed_rewinds``).

    The synchronous work of a batch (decode, alignment, join, store prepare and commit) runs on
    one pipeline thread, always under ``lock``: a batch of 10K events is a few tenths of a second
    of CPU, and on the event loop it starved faust's web server (``/counters`` unanswered for a
    whole run) and timers; with the GIL switching every 5 ms the loop now answers in between.
    """

    def __init__(self, config: JoinerAppConfig, *, send, read_back, caught_up, assigned=None, seek=None,
                 remote: RemoteStats | None = None, extra_counters=None, restore=None, send_many=None,
                 reread=None, first_offset=None) -> None:
        self.config = config
        self._first_offset = first_offset
        self._reread = reread
        self._send_many = send_many
        self._restore = restore if config.changelog else None
        self._remote = remote
        self._extra_counters = extra_counters or dict
        self._send, self._read_back, self._caught_up = send, read_back, caught_up
        self._assigned = assigned or (lambda p: True)
        self._seek = seek
        self.partitions: dict[int, _Partition] = {}
        self.lock = asyncio.Lock()
        self.closed_counters: dict[int, dict[str, int]] = {}
        self._last_log_s = time.monotonic()
        #: (monotonic_s, partition, events) when a partition's first records arrive and after each
        #: of the last commits that had entries: the partition's events counter, all of them
        #: committed (``/progress``)
        self.progress: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=PROGRESS_STEPS)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="joiner-pipeline")

    # -- assignment ---------------------------------------------------------------------------
    async def _open(self, p: int) -> _Partition:
        part = self.partitions.get(p)
        if part is not None:
            return part
        deadline = time.monotonic() + self.config.store_lock_wait_s
        restore = None if self._restore is None else (lambda store: self._restore_store(p, store))
        loop = asyncio.get_running_loop()
        while True:  # the previous owner (another worker on this host) may still be closing it
            try:
                pipe = await loop.run_in_executor(None, open_pipeline, store_path(self.config.data_dir, p), p,
                                                  self.config.pipeline, self._remote, restore)
                break
            except Exception as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        remote = self._remote
        if remote is not None and any(remote.pruned_before(q) > a for q, a in pipe.shared_needs_committed.items()):
            logger.info("stats_reread partition=%d (its state needs statistics epochs pruned here)", p)
            try:
                if self._reread is None:
                    raise RuntimeError(f"partition {p} needs pruned joiner.dwell epochs and no feed can re-read them")
                await self._reread()
            except BaseException:
                pipe.close()
                raise
        offsets = {t: pipe.committed_offset(t) or 0 for t in EVENT_TOPICS}
        ledger = OutputLedger()
        found = []
        for topic in output_topics():
            raw = pipe.meta(OutputLedger.meta_name(topic))
            start = 0 if raw is None else int(raw)
            ledger.end_offsets[topic] = start
            values = await asyncio.get_running_loop().run_in_executor(None, self._read_back, topic, p, start)
            found += [(topic, v) for v in values]
        ledger.suppress(found)
        part = self.partitions[p] = _Partition(pipe, TopicAligner(offsets), ledger)
        logger.info("partition_assigned partition=%d offsets=%s resend_suppressed=%d", p, offsets, len(found))
        if pipe.republish_staged:
            # the changelog ends in a batch that was never committed: commit the keys' committed
            # values past it now, before compaction can drop them (streams.joiner.changelog)
            await self._commit(p, part)
            logger.info("changelog_republished partition=%d (committed)", p)
        return part

    def _restore_store(self, p: int, store) -> tuple[int, int, set[bytes], bool]:
        """Bring ``store`` up to the end of its changelog partition (blocking: an executor runs it);
        returns the batches and records applied, the keys to republish and whether it rebuilt."""
        (raw,) = store._get_many([fs_keys.meta_key(CHANGELOG_NEXT_META)])
        start = 0 if raw is None else int(raw)
        rebuilt = False
        try:
            res = self._restore(p, start, store.apply_changes)
        except ChangelogCompacted as exc:
            # e.g. this host's store is from before another owner's time, and compaction ran
            # over that time: deletes it never saw may be gone from the log
            n_keys = store.clear()
            logger.warning("changelog_compacted partition=%d changelog_from=%d missing_at=%d: store cleared "
                           "(keys=%d), rebuilding it from the changelog's start", p, start, exc.missing_at, n_keys)
            start = 0
            res = self._restore(p, 0, store.apply_changes)
            rebuilt = True
        if res.end > start:
            store.apply_changes([(fs_keys.meta_key(CHANGELOG_NEXT_META), str(res.end).encode())])
        if res.n_commits:
            logger.info("store_restored partition=%d changelog_from=%d changelog_to=%d batches=%d records=%d",
                        p, start, res.end, res.n_commits, res.n_records)
        return res.n_commits, res.n_records, res.unfinished, rebuilt

    async def position(self, p: int) -> dict[str, int] | None:
        """Open partition ``p`` (if needed) and return where its consumer must read from: per topic,
        the next offset the aligner expects (the store's offsets on a fresh open). None when ``p``
        is no longer assigned (a rebalance while an earlier partition was opened)."""
        async with self.lock:
            if p not in self.partitions and not self._assigned(p):
                return None
            part = await self._open(p)
            return {t: part.aligner.next_received(t) for t in EVENT_TOPICS}

    def revoke(self, partitions) -> None:
        for p in sorted(partitions):
            part = self.partitions.pop(p, None)
            if part is not None:
                part.aligner.drop()
                self.closed_counters[p] = part.pipeline.counters()
                part.pipeline.close()
                logger.info("partition_revoked partition=%d", p)

    def close(self) -> None:
        self.revoke(list(self.partitions))
        self._pool.shutdown(wait=True)

    # -- the hot path ---------------------------------------------------------------------------
    async def handle(self, messages: list[Any]) -> list[Any]:
        """Process one batch of consumed records (faust ``Message``: topic, partition, offset, key,
        value); returns the records that may now be acked."""
        async with self.lock:
            acks: list[Any] = []
            by_tp: dict[tuple[str, int], list[Any]] = {}
            for m in messages:
                by_tp.setdefault((m.topic, m.partition), []).append(m)
            touched, gaps = set(), {}
            for (topic, p), msgs in by_tp.items():
                if p not in self.partitions and not self._assigned(p):
                    continue  # in flight from before a rebalance: another worker owns it now
                part = await self._open(p)
                part.last_event_s = time.monotonic()
                if not part.received:  # the start of this owner's progress: nothing new committed yet
                    part.received = True
                    self.progress.append((part.last_event_s, p, part.pipeline.core.counters()["events"]))
                part.flushed = False
                seen, gap = await self._run(self._ingest, part, topic, msgs)
                acks += seen
                if gap is not None:
                    gaps[(topic, p)] = gap
                touched.add(p)
            for (topic, p), offset in sorted(gaps.items()):
                # offsets without records would make the partition seek back here forever
                offset = await self._resume_at(p, self.partitions[p], topic, offset)
                # e.g. local state lost while the group committed further: rebuild from the log
                logger.warning("offset_gap topic=%s partition=%d seek_to=%d", topic, p, offset)
                if self._seek is None:
                    raise RuntimeError(f"offset gap on {topic}[{p}] and no way to seek back to {offset}")
                await self._seek(topic, p, offset)
            for p in sorted(touched):
                acks += await self._step(p)
            return acks

    async def _run(self, fn, *args):
        """``fn(*args)`` on the pipeline thread (see the class docstring)."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @staticmethod
    def _ingest(part: _Partition, topic: str, msgs: list[Any]) -> tuple[list[Any], int | None]:
        """Decode one topic's records into the partition's aligner; returns the records already
        seen (to ack) and, on a gap, the offset to seek back to."""
        decoded = decode_batch([m.value for m in msgs], kind_of(topic))
        reasons = dict(decoded.errors)
        good = iter(from_records(decoded.records, kind_of(topic), checked=True))
        seen, gap, add = [], None, part.aligner.add
        for i, m in enumerate(msgs):
            if i in reasons:
                entry = Entry(topic, m.offset, None, m, m.key, m.value, reasons[i])
            else:
                entry = Entry(topic, m.offset, next(good), m)
            status = add(entry)
            if status == TopicAligner.SEEN:  # HELD (a copy still queued) is acked on release
                seen.append(m)
            elif status == TopicAligner.GAP:
                gap = part.aligner.next_received(topic)
        return seen, gap

    async def tick(self) -> list[Any]:
        """Release what became releasable without new events; flush idle partitions."""
        async with self.lock:
            acks: list[Any] = []
            now = time.monotonic()
            for p, part in sorted(self.partitions.items()):
                if now - part.last_event_s >= HOLE_CHECK_S and now - part.hole_checked_s >= HOLE_CHECK_S:
                    part.hole_checked_s = now
                    await self._skip_trailing_holes(p, part)
                idle = self.config.idle_flush_s
                # ended = idle AND caught up on every topic (a paused or slow fetch is not an end)
                flush = (idle is not None and not part.flushed and now - part.last_event_s >= idle
                         and all(self._caught_up(t, p, part.aligner.next_received(t)) for t in EVENT_TOPICS))
                acks += await self._step(p, flush=flush)
                if flush:
                    part.flushed = True
                    logger.info("partition_idle_flush partition=%d idle_s=%.1f", p, now - part.last_event_s)
            self._prune_remote()
            if now - self._last_log_s >= self.config.log_every_s:
                self._last_log_s = now
                logger.info("joiner_counters %s", summary_line(self.counters()))
            return acks

    async def _skip_trailing_holes(self, p: int, part: _Partition) -> None:
        """An idle partition whose topic waits for offsets that hold no records, with no later
        record to reveal the gap (e.g. retention emptied a quiet topic past this store's offset):
        skip them as ``handle`` does, or the merge waits on that topic for good."""
        for topic in EVENT_TOPICS:
            nxt = part.aligner.next_received(topic)
            if not part.aligner.queued(topic) and not self._caught_up(topic, p, nxt):
                await self._resume_at(p, part, topic, nxt)

    async def _resume_at(self, p: int, part: _Partition, topic: str, offset: int) -> int:
        """Where ``topic``'s records resume from ``offset`` (the partition expects ``offset`` next):
        offsets up to there that hold no records are skipped (counted, logged); ``offset`` itself
        when records are there, or without ``first_offset``."""
        if self._first_offset is None:
            return offset
        first = await asyncio.get_running_loop().run_in_executor(None, self._first_offset, topic, p, offset)
        if first > offset:
            part.aligner.skip_to(topic, first)
            part.pipeline.count_skipped_offsets(topic, first - offset)
            logger.warning("source_offsets_missing topic=%s partition=%d from=%d to=%d (deleted by retention, "
                           "compacted or transaction markers): skipped", topic, p, offset, first)
        return max(first, offset)

    def _prune_remote(self) -> None:
        remote = self._remote
        if remote is None or not self.partitions:
            return  # nothing held (e.g. between a rebalance's revoke and assign): nothing to go by
        needs = {p: part.pipeline.shared_needs_committed for p, part in self.partitions.items()}
        oldest = min((a for n in needs.values() for a in n.values()), default=None)
        for q in range(remote.n_sources):
            of_q = [n.get(q, 0) for p, n in needs.items() if p != q]
            before = min(of_q) if of_q else oldest
            if before is not None:
                remote.prune(q, before)

    async def _step(self, p: int, flush: bool = False) -> list[Any]:
        part = self.partitions[p]
        entries, outputs = await self._run(self._join, p, part, flush)
        if not entries and not flush:
            return []
        pipe = part.pipeline
        await produce(self._send, p, part.ledger, outputs, self._send_many)
        await self._commit(p, part)
        if entries:
            self.progress.append((time.monotonic(), p, pipe.core.counters()["events"]))
        return [e.handle for e in entries]

    async def _commit(self, p: int, part: _Partition) -> None:
        """Commit partition ``p``'s staged state (with the changelog on: the changelog first, so it
        is never behind the store)."""
        pipe = part.pipeline
        if self._restore is None:
            await self._run(pipe.commit, part.aligner.next_offsets(), part.ledger.meta())
            return
        seq, changes = await self._run(pipe.prepare, part.aligner.next_offsets(), part.ledger.meta())
        local = None
        if changes:
            nxt = await produce_changelog(self._send, p, make_tag(part.writer_id, seq), changes, self._send_many)
            local = {CHANGELOG_NEXT_META: str(nxt).encode()}
        await self._run(pipe.commit_prepared, local)

    def _join(self, p: int, part: _Partition, flush: bool) -> tuple[list[Entry], list[Record]]:
        """Release what the aligner can, join it and build the output records (pipeline thread)."""
        entries = part.aligner.release(lambda t, nxt: self._caught_up(t, p, nxt), force=flush)
        if not entries and not flush:
            return entries, []
        pipe = part.pipeline
        outputs: list[Record] = []
        events = []
        for e in entries:
            if e.event is None:
                pipe.count_dead_letter(e.topic, e.reason.split(":", 1)[0])
                outputs.append(dead_letter_record(p, e))
            else:
                events.append(e.event)
        out = pipe.process(events) if events else PipelineOutput()
        if flush:
            out.extend(pipe.finish())
        if self._remote is not None:
            # partitions of this worker see it at once (the feed's copy is then a duplicate): a
            # partition's contributions do not depend on whether its commit survives
            for value in out.stats:
                self._remote.add(value, local=True)
        outputs += output_records(p, out)
        return entries, outputs

    def counters(self) -> dict[str, int]:
        """Counters summed over the partitions this worker holds or held."""
        live = {p: part.pipeline.counters() for p, part in self.partitions.items()}
        return {**merge_counters({**self.closed_counters, **live}.values()), **self._extra_counters()}

    def counters_by_partition(self) -> dict[str, dict[str, int]]:
        live = {p: part.pipeline.counters() for p, part in self.partitions.items()}
        return {str(p): c for p, c in sorted({**self.closed_counters, **live}.items())}


def make_app(config: JoinerAppConfig) -> tuple[faust.App, JoinerRuntime]:
    """The faust app and the runtime its agent drives (the caller runs the app, e.g. faust.Worker)."""
    faustfix.install()  # faust's recovery could lose input records fetched while it seeks
    web = {"web_enabled": False}
    if config.web_port is not None:
        port = config.web_port or free_port(config.web_host)  # faust refuses port 0
        web = {"web_enabled": True, "web_port": port, "web_bind": config.web_host, "web_host": config.web_host}
        logger.info("joiner_web url=http://%s:%d/counters", config.web_host, port)
    drain = BatchDrain(EVENT_TOPICS) if config.delivery == "batch" else None
    app = _JoinerApp(
        config.app_id, broker=f"kafka://{config.bootstrap}", store="memory://",
        datadir=str(config.data_dir / "faust"), autodiscover=False,
        topic_replication_factor=1, consumer_auto_offset_reset="earliest",
        broker_commit_interval=0.5, broker_heartbeat_interval=0.5,
        broker_session_timeout=config.session_timeout_s,  # how soon a dead worker's partitions move
        stream_wait_empty=False, broker_max_poll_records=config.batch_max,
        consumer_max_fetch_size=8 << 20,  # the aligner holds unacked events; a rebalance must not wait for them
        producer_max_request_size=8 << 20,  # a changelog record holds one store value (meta blobs grow with an epoch's clicks)
        **web)
    app.batch_drain = drain
    cap_fetch_wait(config.fetch_max_wait_ms)
    # subscribed through the conductor (faust's group membership and assignment); the records
    # themselves reach the joiner through the drain, not through a stream. With faust's stream
    # path the agent subscribes the topic itself: registering it here too added a channel nobody
    # iterates, and every record the conductor offered it raised "Cannot put on Topic channel
    # before aiter"; once that channel was full faust paused the partition for good (a stalled
    # worker, seen in scripts/bench_joiner.py's stream phase)
    source = app.topic(*EVENT_TOPICS, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    if drain is not None:
        app.topics.add(source)

    async def send(topic, key, value, partition, headers):
        return await app.producer.send(topic, key, value, partition, None, headers)

    senders: list = []

    async def send_many(topic, partition, records, whole=False):
        if not senders:  # the producer exists once the app runs
            senders.append(batch_sender(app.producer._ensure_producer(), SEND_BATCH_BYTES))
        return await senders[0](topic, partition, records, whole)

    def caught_up(topic: str, partition: int, next_offset: int) -> bool:
        from faust.types import TP
        try:
            hw = app.consumer.highwater(TP(topic, partition))
        except Exception:  # not fetched yet / consumer not ready
            return False
        return hw is not None and next_offset >= hw

    def assigned(partition: int) -> bool:
        return any(tp.partition == partition and tp.topic in EVENT_TOPICS for tp in app.consumer.assignment())

    async def seek(topic: str, partition: int, offset: int) -> bool:
        """Seek ``topic[partition]`` if it is still assigned here; False when it was not."""
        from aiokafka.errors import IllegalStateError
        from faust.types import TP
        tp = TP(topic, partition)
        if tp not in app.consumer.assignment():  # moved to another worker meanwhile
            logger.info("seek_skipped topic=%s partition=%d (no longer assigned)", topic, partition)
            return False
        try:
            await app.consumer.seek(tp, offset)
        except (AssertionError, IllegalStateError):  # unassigned after the check (a rebalance began)
            logger.info("seek_skipped topic=%s partition=%d (assignment changing)", topic, partition)
            return False
        return True

    feed = None
    if config.pipeline.shared_stats:
        from streams.joiner.statsfeed import StatsFeed
        feed = StatsFeed(config.bootstrap).start()
        if not feed.wait_caught_up(config.store_lock_wait_s):
            logger.warning("stats_feed_slow: starting before joiner.dwell was read to its end")

    async def reread() -> None:
        ticket = feed.rewind()
        if not await asyncio.get_running_loop().run_in_executor(None, feed.wait_rewound, ticket,
                                                                config.store_lock_wait_s):
            # as at startup: what has arrived is used, samples labelled before the rest arrives
            # are marked (the stats.applied header), the feed goes on reading
            logger.warning("stats_reread_slow: joiner.dwell not read again within %.0fs", config.store_lock_wait_s)

    # one client for every read-back and changelog replay of a partition's open
    reader = PartitionReader(config.bootstrap, owned_topics())
    runtime = JoinerRuntime(config, send=send, read_back=reader.read_values, caught_up=caught_up,
                            assigned=assigned, seek=seek, remote=None if feed is None else feed.table,
                            extra_counters=lambda: {**(drain.counters() if drain else {}),
                                                    **(feed.counters() if feed else {})},
                            restore=lambda p, start, apply: read_changelog(reader, p, start, apply),
                            send_many=send_many, reread=None if feed is None else reread,
                            first_offset=reader.first_offset)
    def ack_all(records) -> None:  # their state is committed: faust may commit their offsets
        ack = app.consumer.ack
        for m in records:
            ack(m)

    if drain is not None:
        @app.task
        async def join():
            while True:
                ack_all(await runtime.handle(await drain.get(config.batch_max)))
    else:  # faust's own per-record path (a comparison in scripts/bench_joiner.py)
        @app.agent(source, concurrency=1)
        async def join_stream(stream):
            async for events in stream.noack_take(config.batch_max, within=0.1):
                ack_all(await runtime.handle([ev.message for ev in events]))

    positioned: set[int] = set()

    @app.timer(config.tick_s)
    async def tick():
        if feed is not None and feed.error is not None:
            await app.crash(RuntimeError(f"joiner.dwell feed failed: {feed.error!r}"))
            return
        if not app.rebalancing and app.flow_control.is_active():
            # the store, not the group, says where to read: after faust has sought to the group's
            # committed offsets, seek each newly assigned partition to its store's offsets (a lost
            # store means offset 0: the state is rebuilt from the topics). faust's recovery seeks
            # to the group's offsets and resumes its flow after the rebalance has ended: a seek of
            # ours before that would be undone. Opening a partition can take seconds (a changelog
            # replay): a rebalance may begin meanwhile, so each partition and each seek is checked
            # against the assignment again.
            for p in sorted({tp.partition for tp in app.consumer.assignment() if tp.topic in EVENT_TOPICS}
                            - positioned):
                if app.rebalancing:
                    break
                where = await runtime.position(p)
                if where is None:
                    continue
                seeks = [await seek(topic, p, offset) for topic, offset in where.items()]
                if all(seeks):
                    positioned.add(p)
                    logger.info("partition_positioned partition=%d", p)
        ack_all(await runtime.tick())

    @app.on_partitions_revoked.connect
    async def on_revoked(app_, revoked, **kwargs):
        async with runtime.lock:
            gone = {tp.partition for tp in revoked if tp.topic in EVENT_TOPICS}
            runtime.revoke(gone)
            positioned.difference_update(gone)

    @app.on_before_shutdown.connect
    async def on_shutdown(app_, **kwargs):
        async with runtime.lock:
            runtime.close()
        if feed is not None:
            feed.stop()
        reader.close()
        print(f"joiner summary: {summary_line(runtime.counters())}", flush=True)

    @app.page("/counters")
    async def counters_page(web, request):
        return web.json({"total": runtime.counters(), "partitions": runtime.counters_by_partition()})

    @app.page("/progress")
    async def progress_page(web, request):
        # the worker's own record of its pace, read once at any time: [monotonic_s, partition,
        # events] after each recent commit (a read of /counters can be answered late under load)
        return web.json({"monotonic_s": time.monotonic(), "steps": list(runtime.progress)})

    return app, runtime


class _JoinerApp(faust.App):
    """faust's App with the joiner's :class:`BatchDrain` installed on its consumer."""

    batch_drain: BatchDrain | None = None

    def _new_consumer(self):
        consumer = super()._new_consumer()
        return consumer if self.batch_drain is None else self.batch_drain.install(consumer)


def free_port(host: str) -> int:
    """A port free on ``host`` right now (the web server binds it a moment later)."""
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
