"""Model versions: what the continuous learner announces on the ``model-updates`` topic.

Each checkpoint the learner publishes becomes one message, keyed by the model name, whose value is
the UTF-8 JSON of a :class:`ModelVersion`. JSON, not pickle: a scorer decodes untrusted bytes from
the network with nothing but ``json.loads`` and field validation; the weights themselves are read
from ``path`` with ``torch.load(..., weights_only=True)`` (:mod:`learner.checkpoint`).

>>> v = ModelVersion(version=3, path="/ckpt/v3.pt", created_at_ms=1_700_000_000_000,
...                  samples_seen=8192, model="dumn", metrics={"auc": 0.71})
>>> ModelVersion.decode(v.encode()) == v
True
>>> ModelVersion.decode(b'{"version": -1, "path": "p", "created_at_ms": 0, "samples_seen": 0}')
Traceback (most recent call last):
...
learner.versions.VersionFormatError: bad model version message: version=-1 < 0
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from learner import LearnerError

logger = logging.getLogger(__name__)

TOPIC_MODEL_UPDATES = "model-updates"
SCHEMA = 1


class VersionFormatError(LearnerError):
    """A ``model-updates`` message is not a valid model version; it is skipped, never half-used."""


@dataclass(frozen=True)
class ModelVersion:
    """One published model: where its checkpoint is and what it had seen when it was cut.

    ``version`` increases by one per publication of a learner run; ``samples_seen`` counts the
    samples trained on; ``metrics`` holds the prequential figures at that point (auc, gauc,
    logloss, valid_read_auc, ...); ``source_offsets`` maps ``"topic/partition"`` to the next
    offset to train on.
    """

    version: int
    path: str
    created_at_ms: int
    samples_seen: int
    model: str = "dumn"
    metrics: dict[str, float] = field(default_factory=dict)
    source_offsets: dict[str, int] = field(default_factory=dict)
    schema: int = SCHEMA

    def __post_init__(self) -> None:
        for name in ("version", "created_at_ms", "samples_seen", "schema"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}={value!r} is not an integer")
            if value < 0:
                raise ValueError(f"{name}={value!r} < 0")
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path={self.path!r} must be a non-empty string")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model={self.model!r} must be a non-empty string")
        for k, v in self.metrics.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"metrics[{k!r}]={v!r} must map a name to a number")
        for k, v in self.source_offsets.items():
            if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"source_offsets[{k!r}]={v!r} must map 'topic/partition' to an offset >= 0")

    @property
    def key(self) -> bytes:
        return self.model.encode("utf-8")

    def encode(self) -> bytes:
        # NaN metrics (e.g. AUC before both classes were seen) travel as null
        row: dict[str, Any] = asdict(self)
        row["metrics"] = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in self.metrics.items()}
        return json.dumps(row, sort_keys=True, separators=(",", ":")).encode("utf-8")

    @classmethod
    def decode(cls, value: bytes | None) -> ModelVersion:
        try:
            row = json.loads(value) if value else None
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            if row.get("schema", SCHEMA) != SCHEMA:
                raise ValueError(f"schema={row.get('schema')!r} (this reader knows {SCHEMA})")
            row["metrics"] = {k: (math.nan if v is None else v) for k, v in (row.get("metrics") or {}).items()}
            return cls(**row)
        except (TypeError, ValueError, UnicodeDecodeError) as exc:
            raise VersionFormatError(f"bad model version message: {exc}") from None


def decode_records(records: list, model: str | None, counters: dict[str, int]) -> list[tuple[ModelVersion, int, int]]:
    """``(version, partition, offset)`` of each valid ``model-updates`` record (only ``model``'s
    when given); ``counters["messages"]`` counts every record, ``counters["malformed"]`` the
    undecodable ones, each logged and skipped."""
    out: list[tuple[ModelVersion, int, int]] = []
    for r in records:
        counters["messages"] = counters.get("messages", 0) + 1
        try:
            v = ModelVersion.decode(r.value)
        except VersionFormatError as exc:
            counters["malformed"] = counters.get("malformed", 0) + 1
            logger.warning("model_version_malformed partition=%d offset=%d reason=%r", r.partition, r.offset,
                           str(exc))
            continue
        if model is None or v.model == model:
            out.append((v, r.partition, r.offset))
    return out


def newest_announced(bootstrap: str, model: str, topic: str = TOPIC_MODEL_UPDATES, timeout_s: float = 30.0,
                     counters: dict[str, int] | None = None) -> int:
    """The highest version announced for ``model`` on ``topic`` (0: none, or no such topic).

    A learner whose checkpoints were moved away starts a fresh model; numbering its versions
    above this one keeps them newer than what the servers already follow (a server takes no
    version at or below the one it serves). Undecodable messages are skipped, logged and
    counted in ``counters`` (:func:`decode_records`)."""
    counters = {} if counters is None else counters
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), group_id=None, enable_auto_commit=False,
                             client_id="streamrec-learner-versions",
                             bootstrap_timeout_ms=max(1, int(timeout_s * 1000)))
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            return 0
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        ends = consumer.end_offsets(tps)
        newest, deadline = 0, time.monotonic() + timeout_s
        while any(consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise LearnerError(f"could not read {topic!r} to its end within {timeout_s:.0f} s")
            records = [r for batch in consumer.poll(timeout_ms=200).values() for r in batch]
            newest = max([newest, *(v.version for v, _, _ in decode_records(records, model, counters))])
        return newest
    finally:
        consumer.close()
