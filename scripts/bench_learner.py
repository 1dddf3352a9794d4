"""The continuous learner end to end on the embedded broker: throughput against the bare training step,
freshness and version interval.

1. **bare step**: ``Trainer.train_batch`` over batches decoded beforehand (score + train only);
2. **pipeline**: the same samples produced to ``samples`` (3 partitions) first, then
   ``ContinuousLearner`` consuming them in a consumer group (poll + decode on the background thread,
   score + train, audit off, checkpoints every ``--checkpoint-every-s`` seconds and version
   announcements); samples/s from the first to the last trained minibatch; the ratio to (1) in the
   same run, and the seconds spent checkpointing;
3. **freshness**: a producer thread sends at ``--rate`` samples/s (default: half the bare rate) for
   ``--duration-s`` to a second topic while a learner trains on it; per sample, the time from its
   producer timestamp to the start of the training step that contains it (p50 / p99 after the first
   ``--settle-s`` seconds), and the interval between published versions (``--version-every-s``).

The broker runs as ``streamrec broker`` in its own process. Synthetic samples (learner/synthetic.py) encoded with the sample contract; the figures measure the
pipeline, not model quality. Prints the machine and the exact command.

    .venv/bin/python scripts/bench_learner.py --samples 20000 --batch-size 256 --duration-s 20
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchutil import command_line, cpu_model, load_average  # noqa: E402
from learner.config import DUMNConfig, EmbeddingConfig  # noqa: E402
from learner.continuous import CheckpointStore, ContinuousLearner, LearnerConfig, VersionPublisher  # noqa: E402
from learner.data import batch_from_columns, decode_columns, iter_frames, write_frames  # noqa: E402
from learner.stream import SampleStream, StreamConfig  # noqa: E402
from learner.synthetic import synthetic_batch  # noqa: E402
from learner.trainer import Trainer, TrainerConfig  # noqa: E402
from streams.samples import SEQUENCE_KINDS, Sample, Snapshot, encode  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=20_000, help="samples for the throughput phases")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=100, help="T (DUMN default 100)")
    p.add_argument("--tiny", action="store_true", help="a test-size DUMN (E=8, m=8) instead of the defaults")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--checkpoint-every-s", type=float, default=10.0, help="checkpoint interval in phase 2")
    p.add_argument("--rate", type=float, default=0.0, help="samples/s produced in phase 3 (0: half the bare rate)")
    p.add_argument("--duration-s", type=float, default=20.0, help="length of phase 3")
    p.add_argument("--settle-s", type=float, default=3.0, help="phase 3 seconds left out of the freshness figures")
    p.add_argument("--version-every-s", type=float, default=5.0, help="checkpoint/version interval in phase 3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--python-crc", action="store_true",
                   help="leave kafka-python's pure-Python CRC-32C in place (the learner CLI installs the compiled one)")
    p.add_argument("--produce-to", default=None, help=argparse.SUPPRESS)     # phase 3's producer process
    p.add_argument("--produce-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_values(n: int, seq_len: int, seed: int, ts0_ms: int = 1_000_000) -> list[tuple[bytes, bytes]]:
    """(key, encoded sample) for n synthetic samples, keyed by user id."""
    out: list[tuple[bytes, bytes]] = []
    chunk = 1024
    for c in range(0, n, chunk):
        b = synthetic_batch(min(chunk, n - c), seq_len, seed=seed + c, start_sample_id=c + 1)
        cols = {k: v.numpy() for k, v in b.tensors().items()}
        for r in range(b.batch_size):
            ts = ts0_ms + c + r
            seq = {}
            for kind in SEQUENCE_KINDS:
                m = cols[f"{kind}_mask"][r]
                seq[f"{kind}_items"] = tuple(cols[f"{kind}_items"][r][m].tolist())
                seq[f"{kind}_cats"] = tuple(cols[f"{kind}_cats"][r][m].tolist())
            clicked = bool(cols["clicked"][r])
            s = Sample(impression_id=int(cols["sample_id"][r]), ts_ms=ts, user_id=int(cols["user_id"][r]),
                       item_id=int(cols["item_id"][r]), label_ts_ms=ts + 1, clicked=clicked,
                       valid_read=clicked and bool(cols["valid_read"][r]), ndt_weight=float(cols["ndt_weight"][r]),
                       item_category=int(cols["item_category"][r]), user_group=int(cols["user_group"][r]),
                       age_group=int(cols["user_profile"][r][0]), item_duration_ms=20_000,
                       snapshot=Snapshot(**seq, newest_ts_ms=ts - 1))
            out.append((str(s.user_id).encode(), encode(s)))
    return out


def trainer_for(args: argparse.Namespace) -> Trainer:
    if args.tiny:
        emb = EmbeddingConfig(dim=8, item_buckets=512, category_buckets=64, user_buckets=256, profile_buckets=64)
        model = DUMNConfig(embedding=emb, n_slots=8, slot_dim=8, controller_dim=16, mlp_dims=(16,), write_chunk=5)
    else:
        model = DUMNConfig()
    return Trainer(TrainerConfig(model="dumn", device=args.device, seed=args.seed, log_every_s=1e9), model)


class TimedTrainer:
    """Wraps a Trainer's train_batch to note the wall time of the first and the last step."""

    def __init__(self, trainer: Trainer):
        self.first = self.last = float("nan")
        self.first_n = 0
        inner = trainer.train_batch

        def timed(batch):
            if trainer.step == 0 or self.first != self.first:
                self.first, self.first_n = time.perf_counter(), batch.batch_size
            out = inner(batch)
            if trainer.device.type == "cuda":
                torch.cuda.synchronize()
            self.last = time.perf_counter()
            return out

        trainer.train_batch = timed


def create_topic(bootstrap: str, topic: str) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
    finally:
        admin.close()


def bare_rate(args, values: list[bytes]) -> float:
    trainer = trainer_for(args)
    batches = [batch_from_columns(decode_columns(values[i:i + args.batch_size], args.seq_len))
               for i in range(0, len(values), args.batch_size)]
    if trainer.device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    for b in batches[:3]:   # warm-up, untimed
        trainer.train_batch(b)
    t0 = time.perf_counter()
    n = 0
    for b in batches[3:]:
        trainer.train_batch(b)
        n += b.batch_size
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def build_learner(args, bootstrap: str, topic: str, group: str, ckpt_dir: Path, every_s: float, max_samples: int):
    """(learner, step timer, checkpoint seconds [one-element list], producer to close)."""
    from kafka import KafkaProducer

    trainer = trainer_for(args)
    timed = TimedTrainer(trainer)
    scfg = StreamConfig(bootstrap=bootstrap, group_id=group, topic=topic, batch_size=args.batch_size,
                        seq_len=args.seq_len, pin_memory=trainer.device.type == "cuda")
    cfg = LearnerConfig(checkpoint_dir=str(ckpt_dir), checkpoint_every_steps=0, checkpoint_every_s=every_s,
                        max_samples=max_samples, freshness_window=10_000_000)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    learner = ContinuousLearner(cfg, trainer, SampleStream(scfg), CheckpointStore(ckpt_dir, 3),
                                publisher=VersionPublisher(producer))
    ckpt_s = [0.0]
    inner = learner.checkpoint

    def timed_checkpoint(reason, wait=False):
        t0 = time.perf_counter()
        out = inner(reason, wait=wait)
        if not wait:            # the pause inside the stream; the final checkpoint comes after the last step
            ckpt_s[0] += time.perf_counter() - t0
        return out

    learner.checkpoint = timed_checkpoint
    learner.restore()
    return learner, timed, ckpt_s, producer


@contextlib.contextmanager
def broker_process(data_dir: Path):
    """``streamrec broker`` in its own process (as deployed: it must not share the learner's GIL)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "streamrec.cli", "--log-level", "WARNING", "broker", "--port",
                             str(port), "--data-dir", str(data_dir)], cwd=Path(__file__).resolve().parents[1])

    def up() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_for(up, 60, "the broker to listen")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_for(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def produce_paced(bootstrap: str, path: str, rate: float, duration_s: float, settle_s: float) -> tuple[int, int]:
    """Send the samples of a samples file round-robin at ``rate``/s for ``duration_s``; -> (sent, sent
    before ``settle_s``). The producer timestamp of each record is its send time."""
    from kafka import KafkaProducer

    values = [v for v, _ in iter_frames(path)]
    keys = [str(int.from_bytes(v[40:48], "little")).encode() for v in values]   # user_id at byte 40
    live = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=2)
    start = time.perf_counter()
    sent, settle_sent = 0, None
    while (now := time.perf_counter()) - start < duration_s:
        due = int((now - start) * rate)
        while sent < due:
            i = sent % len(values)
            live.send("samples-live", key=keys[i], value=values[i])
            sent += 1
        if settle_sent is None and now - start >= settle_s:
            settle_sent = sent
        time.sleep(0.001)
    live.flush()
    live.close()
    return sent, settle_sent or 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    if args.produce_to:
        from learner.stream import use_compiled_crc32c
        use_compiled_crc32c()
        print(*produce_paced(args.produce_to, args.produce_file, args.rate, args.duration_s, args.settle_s))
        return
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from kafka import KafkaProducer

    from learner.stream import use_compiled_crc32c
    crc = "pure-python" if args.python_crc else ("compiled" if use_compiled_crc32c() else "pure-python")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"machine: python={platform.python_version()} torch={torch.__version__} cpu={cpu_model()!r} "
          f"cores={os.cpu_count()} torch_threads={torch.get_num_threads()} gpu={gpu} load1={load_average():.2f}")
    print(f"command: {command_line()}")
    model = "DUMN tiny (E=8 m=8 Z=8)" if args.tiny else "DUMN defaults (E=16 m=256 Z=64 buckets 2^18)"
    print(f"model: {model} T={args.seq_len} batch_size={args.batch_size} device={trainer_for(args).device} "
          f"kafka_python_crc32c={crc}")
    t0 = time.perf_counter()
    keyed = make_values(args.samples, args.seq_len, args.seed)
    print(f"encoded {len(keyed)} samples in {time.perf_counter() - t0:.1f}s "
          f"({np.mean([len(v) for _, v in keyed]):.0f} bytes each)", flush=True)

    bare = bare_rate(args, [v for _, v in keyed])
    print(f"bare_step samples_per_s={bare:.1f}", flush=True)

    with tempfile.TemporaryDirectory() as tmp, broker_process(Path(tmp) / "broker") as bootstrap:
        create_topic(bootstrap, "samples")
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5, batch_size=1 << 20)
        for k, v in keyed:
            producer.send("samples", key=k, value=v)
        producer.flush()
        producer.close()
        learner, timed, ckpt_s, out = build_learner(args, bootstrap, "samples", "bench", Path(tmp) / "ckpt",
                                                    args.checkpoint_every_s, args.samples)
        try:
            learner.run(threading.Event())
        finally:
            out.close()
        ckpt_s = ckpt_s[0]
        n = learner.trainer.samples_seen - timed.first_n
        span = timed.last - timed.first
        rate = n / span
        bare_after = bare_rate(args, [v for _, v in keyed])   # the machine is shared: bracket the pipeline
        bare = (bare + bare_after) / 2
        print(f"bare_step_after samples_per_s={bare_after:.1f} (mean {bare:.1f})")
        print(f"pipeline samples_per_s={rate:.1f} ratio_to_bare={rate / bare:.3f} overhead={1 - rate / bare:.1%} "
              f"checkpoints={learner.stats.n_versions} training_paused_for_checkpoints_s={ckpt_s:.2f} "
              f"(checkpoint every {args.checkpoint_every_s:g} s; span {span:.1f} s) load1={load_average():.2f}",
              flush=True)

        # phase 3: paced production, freshness and version interval
        rate_in = args.rate or bare / 2
        create_topic(bootstrap, "samples-live")
        stop = threading.Event()
        learner2, _, _, out2 = build_learner(args, bootstrap, "samples-live", "bench-live", Path(tmp) / "ckpt-live",
                                             args.version_every_s, 0)
        th = threading.Thread(target=learner2.run, args=(stop,), daemon=True)
        th.start()
        wait_for(lambda: len(learner2.stream.assignment()) == 3, 60, "the live learner to own the partitions")
        frames = Path(tmp) / "live.samples"
        write_frames(frames, [v for _, v in keyed])
        # the producer is another process, as in production: it must not share this one's GIL
        proc = subprocess.run([sys.executable, __file__, "--produce-to", bootstrap, "--produce-file", str(frames),
                               "--rate", str(rate_in), "--duration-s", str(args.duration_s),
                               "--settle-s", str(args.settle_s)], check=True, capture_output=True, text=True)
        sent, settle_sent = map(int, proc.stdout.split())
        wait_for(lambda: learner2.trainer.samples_seen >= sent, 120, "the live learner to catch up")
        stop.set()
        th.join(timeout=60)
        out2.close()
        fresh = learner2.freshness_ms()
        fresh = fresh[-max(1, sent - (settle_sent or 0)):] / 1000.0
        times = np.diff(np.array(learner2.stats.version_times_s))
        print(f"freshness rate_in={rate_in:.0f}/s duration_s={args.duration_s:g} trained={learner2.trainer.samples_seen} "
              f"of sent={sent} p50_s={np.percentile(fresh, 50):.3f} p99_s={np.percentile(fresh, 99):.3f} "
              f"max_s={fresh.max():.3f}", flush=True)
        if len(times):
            print(f"versions={learner2.stats.n_versions} interval_s median={np.median(times):.2f} "
                  f"max={times.max():.2f} (configured {args.version_every_s:g} s)", flush=True)
        else:
            print(f"versions={learner2.stats.n_versions} (too few for an interval)")


if __name__ == "__main__":
    main()
