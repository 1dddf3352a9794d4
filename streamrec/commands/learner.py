"""``streamrec learner``: train continuously from the ``samples`` topic, checkpoint, publish versions.

Consumes ``samples`` in a consumer group, scores then trains every minibatch, cuts an atomic
checkpoint every ``--checkpoint-every-steps`` minibatches or ``--checkpoint-every-s`` seconds (and
before partitions are revoked, and on SIGTERM/SIGINT, after which it exits 0), announces each one
on ``model-updates`` and commits the offsets it holds. A restart resumes from the newest checkpoint
that verifies, at its offsets (learner/continuous.py explains why no sample is trained twice).

Settings: dataclass defaults < the ``[learner]`` table of ``--config`` (LearnerConfig fields, with
``[learner.stream]`` StreamConfig, ``[learner.trainer]`` TrainerConfig, ``[learner.model]`` the
model config and ``[learner.clsd]``) < flags.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

from streamrec.config import ConfigError, build, load_section

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "learner", help="continuous prequential training from the samples topic",
        description="Consume the samples topic in a consumer group, score then train every minibatch, "
                    "checkpoint atomically, announce each checkpoint on model-updates; SIGTERM checkpoints "
                    "and exits 0; a restart resumes at the newest good checkpoint's offsets.")
    p.add_argument("--bootstrap", required=True, metavar="HOST:PORT", help="Kafka bootstrap servers")
    p.add_argument("--group", default=None, help="consumer group (default streamrec-learner)")
    p.add_argument("--topic", default=None, help="samples topic (default samples)")
    p.add_argument("--checkpoint-dir", required=True, metavar="DIR", help="checkpoints ckpt-<version>.pt go here")
    p.add_argument("--model", default=None, help="dumn | wide_deep | deepfm | dcn | din (default dumn)")
    p.add_argument("--model-name", default=None, help="key of the model-updates messages (default: --model)")
    p.add_argument("--objective", default=None, help="bce | clsd | valid_read | mtl | mtl_clsd (default bce)")
    p.add_argument("--batch-size", type=int, default=None, help="records per minibatch at most (default 256)")
    p.add_argument("--seq-len", type=int, default=None, help="behaviour sequence length T (default 100)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default 0.005)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="auto | cpu | cuda")
    p.add_argument("--checkpoint-every-steps", type=int, default=None, help="minibatches between checkpoints "
                   "(default 1000, 0: by time only)")
    p.add_argument("--checkpoint-every-s", type=float, default=None, help="seconds between checkpoints "
                   "(default 10, 0: by steps only)")
    p.add_argument("--keep-checkpoints", type=int, default=None, help="newest checkpoints kept (default 3)")
    p.add_argument("--max-samples", type=int, default=None, help="stop after this many samples (default: never)")
    p.add_argument("--audit-log", default=None, metavar="FILE",
                   help="append 'partition offset sample_id' of every trained sample (cut back on restart "
                        "to the restored checkpoint, so it lists exactly the samples inside the model)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="serve Prometheus metrics on this port (0: any free port; default: off)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="metrics bind address (default 127.0.0.1)")
    p.add_argument("--cumulative-gauc", action="store_true", default=None,
                   help="also keep the cumulative GAUC (its state grows with every user seen: for bounded runs)")
    p.add_argument("--no-publish", action="store_true", help="checkpoint without announcing versions")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    d = p.add_argument_group("several learner processes (torch.distributed; docs/learner.md)")
    d.add_argument("--world-size", type=int, default=None,
                   help="learner processes training one model (default: WORLD_SIZE from torchrun, else 1)")
    d.add_argument("--rank", type=int, default=None, help="this process's rank (default: RANK from torchrun)")
    d.add_argument("--dist-init", default=None, metavar="URL",
                   help="rendezvous: tcp://HOST:PORT (rank 0 listens) or env:// (default env://)")
    d.add_argument("--dist-backend", default=None, help="auto | gloo | nccl (default auto: nccl on CUDA)")
    d.add_argument("--dist-timeout-s", type=float, default=None, help="longest wait in one collective (default 300)")
    d.add_argument("--dist-digest", default=None, metavar="FILE",
                   help="on exit, write this rank's JSON digest (state hashes, samples, partitions trained)")
    p.set_defaults(func=run)


def _dist_config(args: argparse.Namespace, section: dict):
    """DistConfig from flags, then torchrun's environment (RANK, WORLD_SIZE), then ``[learner.distributed]``."""
    import os

    from learner.distributed import DistConfig

    env_world = os.environ.get("WORLD_SIZE")
    return build(DistConfig, section, {
        "world_size": args.world_size if args.world_size is not None else (int(env_world) if env_world else None),
        "rank": args.rank if args.rank is not None else (int(os.environ["RANK"]) if env_world and "RANK" in os.environ
                                                         else None),
        "init_method": args.dist_init, "backend": args.dist_backend, "timeout_s": args.dist_timeout_s})


def _model_config(name: str, heads: tuple[str, ...], section: dict):
    from learner.models import MODEL_CONFIGS

    def tuples(d: dict) -> dict:
        return {k: tuples(v) if isinstance(v, dict) else tuple(v) if isinstance(v, list) else v for k, v in d.items()}

    return build(MODEL_CONFIGS[name], tuples(section), {"heads": heads})


def run(args: argparse.Namespace) -> int:
    from kafka import KafkaProducer

    from streamrec.alloc import apply_for_decoding
    from streamrec.signals import StopOnSignal

    from learner.config import CLSDConfig
    from learner.continuous import AuditLog, CheckpointStore, ContinuousLearner, LearnerConfig, VersionPublisher
    from learner.progress import ProgressLine
    from learner.prometheus import MetricsRegistry, MetricsServer, PrometheusConfig, describe_learner_metrics
    from learner.stream import SampleStream, StreamConfig
    from learner.versions import newest_announced
    from learner.trainer import Trainer, TrainerConfig
    from streams.dlq import DeadLetterRouter

    apply_for_decoding()  # batches of decoded samples: keep freed memory warm (streamrec/alloc.py)
    section = dict(load_section(args.config, "learner"))
    stream_section = dict(section.pop("stream", {}) or {})
    trainer_section = dict(section.pop("trainer", {}) or {})
    model_section = dict(section.pop("model", {}) or {})
    clsd_section = dict(section.pop("clsd", {}) or {})
    dist_section = dict(section.pop("distributed", {}) or {})
    try:
        import torch
        dcfg = _dist_config(args, dist_section)
        ranked = dcfg.world_size > 1
        if ranked and args.audit_log:
            args.audit_log = f"{args.audit_log}.rank{dcfg.rank}"
        cfg = build(LearnerConfig, section, {
            "checkpoint_dir": args.checkpoint_dir, "model_name": args.model_name,
            "checkpoint_every_steps": args.checkpoint_every_steps, "checkpoint_every_s": args.checkpoint_every_s,
            "keep_checkpoints": args.keep_checkpoints, "max_samples": args.max_samples, "audit_log": args.audit_log,
            "publish_versions": False if args.no_publish else None})
        if trainer_section.get("keep_predictions"):
            raise ConfigError("[learner.trainer] keep_predictions: the learner never ends, so its kept "
                              "predictions would grow without bound (train-offline keeps them)")
        # the cumulative GAUC's per-user state grows with every user seen: off unless asked for
        tcfg = build(TrainerConfig, {"cumulative_gauc": False}, trainer_section,
                     {"model": args.model, "objective": args.objective, "lr": args.lr, "seed": args.seed,
                      "device": args.device, "cumulative_gauc": args.cumulative_gauc},
                     {"clsd": build(CLSDConfig, clsd_section)})
        model_cfg = _model_config(tcfg.model, tcfg.heads, model_section)
        if ranked and tcfg.device != "cpu" and torch.cuda.is_available():
            import os
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dcfg.rank % torch.cuda.device_count())))
        trainer = Trainer(tcfg, model_cfg)
        # pinned batches on CUDA unless [learner.stream] says otherwise
        scfg = build(StreamConfig, {"pin_memory": trainer.device.type == "cuda" and torch.cuda.is_available()},
                     stream_section, {"bootstrap": args.bootstrap, "group_id": args.group, "topic": args.topic,
                                      "batch_size": args.batch_size, "seq_len": args.seq_len})
        if ranked:
            scfg = dataclasses.replace(scfg, client_id=f"{scfg.client_id}-rank{dcfg.rank}")
        metrics_port = args.metrics_port + dcfg.rank if ranked and args.metrics_port else args.metrics_port
        metrics_cfg = PrometheusConfig(host=args.metrics_host, port=metrics_port or 0)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    from learner.stream import use_compiled_crc32c
    if not use_compiled_crc32c():
        logger.warning("kafka-python checks CRCs in pure Python (no crc32c or aiokafka build): consumption "
                       "is capped near 6 MB/s")

    # SIGTERM/SIGINT: the current minibatch finishes, then the final checkpoint (a second signal
    # does not cut that short)
    stop = StopOnSignal(interrupt_on_second=False).install()

    comm = None
    if ranked:
        from learner.distributed import Comm
        comm = Comm.init(dcfg, trainer.device)
    producer = KafkaProducer(bootstrap_servers=scfg.bootstrap.split(","), acks="all", client_id=f"{scfg.client_id}-out")
    server = learner = store = None
    try:
        registry = None
        if args.metrics_port is not None:
            registry = MetricsRegistry()
            describe_learner_metrics(registry)
            server = MetricsServer(metrics_cfg, registry)
            print(f"metrics url={server.url}", file=sys.stderr, flush=True)
        stream = SampleStream(scfg, router=DeadLetterRouter(producer))
        publish = cfg.publish_versions and (comm is None or comm.rank == 0)
        parts = dict(
            publisher=VersionPublisher(producer, timeout_s=cfg.publish_timeout_s) if publish else None,
            audit=AuditLog(cfg.audit_log) if cfg.audit_log else None, registry=registry,
            progress=None if args.no_progress else ProgressLine(sys.stderr))
        store = CheckpointStore(cfg.checkpoint_dir, cfg.keep_checkpoints)
        if comm is None or comm.rank == 0:   # the ranks of one run share the directory; rank 0 writes
            store.lock()
        if comm is None:
            learner = ContinuousLearner(cfg, trainer, stream, store, **parts)
        else:
            from learner.distributed import DistributedLearner
            learner = DistributedLearner(cfg, trainer, stream, store, comm=comm, dist_cfg=dcfg, **parts)
        if publish:   # a fresh model (checkpoints moved away) numbers its versions above the announced ones
            learner.version_floor = newest_announced(scfg.bootstrap, learner.model_name)
        restored = learner.restore()
        logger.info("learner start group=%s topic=%s model=%s objective=%s device=%s batch_size=%d restored_version=%d "
                    "checkpoint_every_steps=%d checkpoint_every_s=%.1f", scfg.group_id, scfg.topic, tcfg.model,
                    tcfg.objective, trainer.device, scfg.batch_size, restored, cfg.checkpoint_every_steps,
                    cfg.checkpoint_every_s)
        learner.run(stop)
        if stop.is_set():
            logger.info("signal received signal=%s: stopped after the final checkpoint", stop.name)
    finally:  # a LearnerError ends in one line (streamrec.cli)
        if server is not None:
            server.close()
        if store is not None:
            store.close()
        producer.close(timeout=10)
        if comm is not None:
            _write_digest(args.dist_digest, learner)
            comm.close()
        stop.restore()  # last: a signal during the shutdown above still only asks to stop
    s = learner.snapshot(learner.clock())
    print(f"samples={s['samples']} steps={s['steps']} rejected={s['rejected']} version={s['version']} "
          f"versions_published={s['versions']} window_auc={s['window_auc']:.4f} checkpoint_dir={cfg.checkpoint_dir}")
    return 0


def _write_digest(path: str | None, learner) -> None:
    if path and learner is not None and hasattr(learner, "digest"):
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(learner.digest(), fh, indent=1, sort_keys=True)
