"""``streamrec score``: score one user's candidate items with the newest published model version.

Without ``--checkpoint`` the command follows ``model-updates`` (learner/scoring.py,
``ModelFollower``): it reads the topic's history, loads the newest version whose checkpoint
verifies, scores, and prints one JSON line. With ``--follow-s N`` it keeps following for N more
seconds and prints a new line each time another version takes over. ``--checkpoint FILE`` scores
with that checkpoint and needs no broker.

``--feature-store`` is either one store directory or the joiner's data directory, whose
per-partition stores (``stores/pNNNN``) are all opened read-only as secondaries: all of a user's
events land in one partition, so the store that knows the user answers. The store config comes
from ``[joiner.pipeline.store]`` of ``--config`` (readers must use the writer's config).

The store keeps no item or user attributes; pass them as the impression would carry them
(``--categories``, ``--durations-ms``, ``--user-group``, ``--age-group``), else the unknown
sentinels are used (docs/scoring.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

from streamrec.config import ConfigError, build, load_section

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "score", help="score a user's candidate items with the newest model version",
        description="Point-in-time features from the feature store + the newest good model version "
                    "from model-updates (or --checkpoint) -> one JSON line of scores.")
    p.add_argument("--bootstrap", default="127.0.0.1:9092", metavar="HOST:PORT", help="brokers to follow")
    p.add_argument("--feature-store", required=True, metavar="PATH",
                   help="a feature store directory, or the joiner's data directory (stores/pNNNN)")
    p.add_argument("--user-id", required=True, type=int)
    p.add_argument("--items", required=True, metavar="ID,ID,...", help="candidate item ids")
    p.add_argument("--categories", default=None, metavar="C,C,...", help="item categories (-1 = unknown)")
    p.add_argument("--durations-ms", default=None, metavar="MS,MS,...", help="item durations (0 = unknown)")
    p.add_argument("--user-group", type=int, default=0, help="the joiner's user group code (0 = unknown)")
    p.add_argument("--age-group", type=int, default=-1, help="age group (-1 = unknown)")
    p.add_argument("--ts-ms", type=int, default=None,
                   help="score as of this event time: history strictly before it (default: all of it)")
    p.add_argument("--checkpoint", default=None, metavar="FILE", help="score with this checkpoint file")
    p.add_argument("--topic", default="model-updates")
    p.add_argument("--model", default=None, help="follow only versions of this model name")
    p.add_argument("--seq-len", type=int, default=None,
                   help="sequence length T (default: the checkpoint's, else 100)")
    p.add_argument("--wait-s", type=float, default=30.0, help="how long to wait for a first version")
    p.add_argument("--follow-s", type=float, default=0.0,
                   help="keep following for this many seconds, one line per new version")
    p.set_defaults(func=run)


class PartitionedFeatures:
    """The joiner's per-partition stores behind one ``user_features``: the first store that holds
    any row of the user answers (a user's events live in one partition; one whose impressions are
    all still open has counters only), else the first store (a user nobody has seen)."""

    def __init__(self, readers: list) -> None:
        self.readers = readers

    def refresh(self) -> None:
        for r in self.readers:
            r.refresh()

    def user_features(self, user_id: int, ts_ms: int | None = None):
        for r in self.readers:
            found = r.find_user_features(user_id, ts_ms)
            if found is not None:
                return found
        return self.readers[0].user_features(user_id, ts_ms)   # nobody knows the user: empty features

    def close(self) -> None:
        for r in self.readers:
            r.close()


def _ints(text: str | None, name: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{name} must be comma-separated integers, got {text!r}") from None


def open_features(path: str | Path, config):
    """A FeatureReader on a store directory, or PartitionedFeatures over a joiner data directory."""
    from featurestore import FeatureReader
    p = Path(path)
    if (p / "CURRENT").exists():
        return FeatureReader(p, config)
    stores = sorted(d for d in (p / "stores").glob("p*") if (d / "CURRENT").exists())
    if not stores:
        raise ConfigError(f"--feature-store {str(p)!r} is neither a feature store nor a joiner data directory")
    readers = []
    try:
        for d in stores:
            readers.append(FeatureReader(d, config))
    except BaseException:
        for r in readers:  # each holds a RocksDB handle and a temporary secondary directory
            r.close()
        raise
    return PartitionedFeatures(readers)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _line(result, follower=None) -> str:
    row = {"user_id": result.user_id, "ts_ms": result.ts_ms, "items": list(result.item_ids),
           "scores": [_finite(float(s)) for s in result.scores], "model": result.model}
    if follower is not None:
        row["follower"] = dict(follower.counters)
    return json.dumps(row, sort_keys=True)


def run(args: argparse.Namespace) -> int:
    from featurestore import FeatureStoreConfig
    from learner import LearnerError
    from learner.scoring import ModelFollower, Scorer, ScoringService

    items = _ints(args.items, "items")
    if not items:
        raise ConfigError("--items names no item")
    context = {"user_group": args.user_group, "age_group": args.age_group,
               "item_categories": _ints(args.categories, "categories"),
               "item_durations_ms": _ints(args.durations_ms, "durations-ms")}
    if args.seq_len is not None and args.seq_len <= 0:
        raise ConfigError(f"--seq-len={args.seq_len} must be > 0")
    store_section = ((load_section(args.config, "joiner").get("pipeline") or {}).get("store") or {})
    # without settings, each store's recorded layout is used
    features = open_features(args.feature_store, build(FeatureStoreConfig, store_section) if store_section else None)
    follower = None
    try:
        if args.checkpoint:
            try:
                source = Scorer.from_checkpoint(args.checkpoint, seq_len=args.seq_len)
            except LearnerError as exc:
                print(f"streamrec score: cannot load checkpoint: {exc}", file=sys.stderr)
                return 1
        else:
            follower = source = ModelFollower(args.bootstrap, topic=args.topic, model=args.model,
                                              seq_len=args.seq_len, bootstrap_timeout_s=args.wait_s).start()
            if not follower.wait_ready(args.wait_s):
                if not follower.connected.is_set():
                    print(f"streamrec score: no bootstrap server at {args.bootstrap} answered within {args.wait_s} s",
                          file=sys.stderr)
                    return 1
                print(f"streamrec score: no loadable model version on {args.topic!r} within {args.wait_s} s "
                      f"(counters {follower.counters})", file=sys.stderr)
                return 1
        service = ScoringService(features, source, refresh_interval_s=0.0)
        try:
            result = service.score_request(args.user_id, items, args.ts_ms, **context)
        except LearnerError as exc:
            print(f"streamrec score: {exc}", file=sys.stderr)
            return 1
        print(_line(result, follower), flush=True)
        if follower is not None and args.follow_s > 0:
            deadline = time.monotonic() + args.follow_s
            shown = result.model["version"]
            try:
                while time.monotonic() < deadline:
                    follower.wait(lambda f: f.current.version.version != shown, deadline - time.monotonic())
                    if follower.current.version.version != shown:
                        result = service.score_request(args.user_id, items, args.ts_ms, **context)
                        shown = result.model["version"]
                        print(_line(result, follower), flush=True)
            except LearnerError as exc:
                print(f"streamrec score: {exc}", file=sys.stderr)
                return 1
        return 0
    finally:
        if follower is not None:
            follower.stop()
        features.close()
