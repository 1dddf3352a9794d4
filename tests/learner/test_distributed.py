"""Several learner processes (torch.distributed, gloo on CPU) training one model.

Oracle tests in two spawned gloo ranks: the merged DUMN memory writes equal one process writing the
concatenated minibatch; the reduced gradient equals the gradient of the mean loss over the union.
End to end: two ``python -m streamrec.cli learner`` ranks in one consumer group on the embedded
broker train every sample once between them and end with identical parameters and memory.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from learner.checkpoint import load_checkpoint
from learner.continuous import CheckpointStore
from learner.distributed import Comm, DistConfig, GradientReducer, merge_memory_writes, pack_writes, state_digest
from learner.models.dumn_memory import UserMemory, sequential_writes
from learner.stream import from_source_offsets
from learner.trainer import Trainer, TrainerConfig
from streams.samples import TOPIC_SAMPLES
from tests.learner.conftest import tiny_config
from tests.learner.test_stream_learner import (REPO_ROOT, TINY_TOML, audit_rows, produce, read_versions,
                                               wait_until)

N_PARTITIONS = 4
COUNTS = (5, 0, 3)          # rank 0 has 5 samples, rank 1 none, rank 2 three (ranks 0 and 1 below)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _writes(seed: int, n: int, m: int = 6, z: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.softmax(torch.randn(n, 4, m, generator=g), -1)                     # (n, 4, m)
    return w, torch.rand(n, 4, z, generator=g), torch.tanh(torch.randn(n, 4, z, generator=g))  # (n, 4, Z) x2


def _listening_addresses() -> set[str]:
    """Local addresses (hex, as /proc/net/tcp* writes them) of this process's listening TCP sockets."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:   # LISTEN, one of ours
                found.add(cols[1].rsplit(":", 1)[0])
    return found


def _rank_main(rank: int, world: int, port: int, counts: tuple[int, ...], n_memories: int, out: str) -> None:
    torch.set_num_threads(1)
    comm = Comm.init(DistConfig(world_size=world, rank=rank, init_method=f"tcp://127.0.0.1:{port}"),
                     torch.device("cpu"))
    try:
        listening = _listening_addresses()
        # rank 0's state reaches every rank through weights-only bytes
        state = comm.broadcast_state({"w": torch.arange(4) * (rank + 1), "meta": ["x", 1]} if rank == 0 else None)
        # memory: the same start on every rank; this rank's writes; merged
        torch.manual_seed(0)
        memory = UserMemory(8, 6, 4, 8, n_memories=n_memories)
        w, e, a = _writes(100 + rank, counts[rank])
        merge_memory_writes(comm, memory, pack_writes(memory, (w, e, a) if counts[rank] else None, counts[rank]),
                            list(counts))
        # gradient: a linear model, mean squared error over this rank's rows
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 1)
        unused = torch.nn.Parameter(torch.ones(2))          # no rank gives it a gradient
        x = torch.randn(sum(counts), 3, generator=torch.Generator().manual_seed(2))  # (N, 3) the union
        first = sum(counts[:rank])
        loss = 0.0
        if counts[rank]:
            lo = model(x[first:first + counts[rank]]).pow(2).mean()
            lo.backward()
            loss = float(lo)
        mean_loss = GradientReducer([*model.parameters(), unused]).reduce(comm, counts[rank], sum(counts), loss)
        torch.save({"memory": memory.memory.clone(), "grads": [p.grad.clone() for p in model.parameters()],
                    "unused_grad": unused.grad, "loss": mean_loss, "state": state,
                    "listening": sorted(listening)}, f"{out}.{rank}")
    finally:
        comm.close()


@pytest.mark.parametrize("n_memories", [4, 1])
def test_merged_writes_and_reduced_gradients_equal_one_process_on_the_union(tmp_path, n_memories):
    counts = COUNTS[:2] if n_memories == 1 else (COUNTS[0], COUNTS[2])
    out = str(tmp_path / "rank")
    mp.spawn(_rank_main, args=(2, free_port(), counts, n_memories, out), nprocs=2, join=True)
    got = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    # reference: one process, the concatenated minibatch, writes in stream order
    torch.manual_seed(0)
    memory = UserMemory(8, 6, 4, 8, n_memories=n_memories)
    w, e, a = (torch.cat(t) for t in zip(*(_writes(100 + r, counts[r]) for r in range(2))))
    if n_memories == 4:
        ref = torch.stack([sequential_writes(memory.memory[k], w[:, k], e[:, k], a[:, k]) for k in range(4)])
    else:   # one shared memory: sample b's four kinds in order, then sample b + 1
        ref = sequential_writes(memory.memory[0], w.reshape(-1, 6), e.reshape(-1, 4), a.reshape(-1, 4))[None]
    torch.manual_seed(1)
    model = torch.nn.Linear(3, 1)
    x = torch.randn(sum(counts), 3, generator=torch.Generator().manual_seed(2))
    loss = model(x).pow(2).mean()
    loss.backward()
    for g in got:
        assert torch.allclose(g["memory"], ref, atol=1e-6)
        for mine, want in zip(g["grads"], [p.grad for p in model.parameters()]):
            assert torch.allclose(mine, want, atol=1e-6)
        assert g["unused_grad"] is None                                     # skipped, as one process would
        assert g["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert torch.equal(got[0]["memory"], got[1]["memory"])                   # bit-identical across ranks
    for g in got:
        assert torch.equal(g["state"]["w"], torch.arange(4)) and g["state"]["meta"] == ["x", 1]  # rank 0's
        # the rendezvous store (rank 0) and gloo listen on loopback only: 127.0.0.1 or ::1
        assert g["listening"] and set(g["listening"]) <= {"0100007F", "00000000000000000000000001000000"}
    assert got[0]["listening"]   # rank 0 holds the store's listener
    assert all(torch.equal(a, b) for a, b in zip(got[0]["grads"], got[1]["grads"]))


def test_module_doctests():
    import doctest

    import learner.dist_comm
    import learner.dist_ops
    import learner.distributed
    for module in (learner.dist_comm, learner.dist_ops, learner.distributed):
        assert doctest.testmod(module).failed == 0


def test_dist_config_refuses_bad_settings():
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        DistConfig(world_size=2, rank=2)
    with pytest.raises(ValueError, match="backend='mpi'"):
        DistConfig(backend="mpi")
    with pytest.raises(ValueError, match="init_method='127.0.0.1:1'"):
        DistConfig(init_method="127.0.0.1:1")


# ---- end to end: two learner processes ---------------------------------------------------------


def _create_topic(bootstrap: str) -> None:
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(TOPIC_SAMPLES, num_partitions=N_PARTITIONS, replication_factor=1)])
    finally:
        admin.close()


def _end_offsets(bootstrap: str) -> dict[int, int]:
    from kafka import KafkaConsumer, TopicPartition
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        return {tp.partition: o for tp, o in
                c.end_offsets([TopicPartition(TOPIC_SAMPLES, p) for p in range(N_PARTITIONS)]).items()}
    finally:
        c.close()


def _launch(bootstrap: str, tmp_path: Path, rank: int, port: int, max_samples: int) -> subprocess.Popen:
    cfg = tmp_path / "learner.toml"
    cfg.write_text(TINY_TOML)
    cmd = [sys.executable, "-m", "streamrec.cli", "--config", str(cfg), "learner", "--bootstrap", bootstrap,
           "--group", "dist-learners", "--checkpoint-dir", str(tmp_path / "ckpt"), "--batch-size", "16",
           "--audit-log", str(tmp_path / "audit.log"), "--no-progress", "--max-samples", str(max_samples),
           "--checkpoint-every-steps", "4", "--world-size", "2", "--rank", str(rank),
           "--dist-init", f"tcp://127.0.0.1:{port}", "--dist-timeout-s", "60",
           "--dist-digest", str(tmp_path / f"digest.{rank}.json")]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    with open(tmp_path / f"rank{rank}.log", "w") as log:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def _assignment(tmp_path: Path, rank: int) -> set[int] | None:
    """The partitions of the rank's latest 'assign partitions=[...]' log line."""
    path = tmp_path / f"rank{rank}.log"
    lines = [ln for ln in path.read_text().splitlines() if "assign partitions=" in ln] if path.exists() else []
    if not lines:
        return None
    inside = lines[-1].split("assign partitions=[", 1)[1].split("]", 1)[0]
    return {int(p) for p in inside.split(",") if p.strip()}


def _wait_split(procs: list[subprocess.Popen], tmp_path: Path) -> None:
    def split() -> bool:
        if any(p.poll() is not None for p in procs):
            raise AssertionError("a rank exited early:\n" + _logs(tmp_path))
        a, b = _assignment(tmp_path, 0), _assignment(tmp_path, 1)
        return bool(a) and bool(b) and not a & b and a | b == set(range(N_PARTITIONS))

    wait_until(split, timeout_s=60, what="the group to split the partitions between the two ranks")


def _finish(procs: list[subprocess.Popen], tmp_path: Path) -> None:
    try:
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], _logs(tmp_path)


def _logs(tmp_path: Path) -> str:
    return "\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(2) if (tmp_path / f"rank{r}.log").exists())


def _digests(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / f"digest.{r}.json").read_text()) for r in range(2)]


def _audit_ids(tmp_path: Path) -> list[int]:
    return [r[2] for k in range(2) if (tmp_path / f"audit.log.rank{k}").exists()
            for r in audit_rows(tmp_path / f"audit.log.rank{k}")]


def _same_model(digests: list[dict]) -> None:
    for key in ("model_sha256", "memory_sha256", "optimizer_sha256", "steps", "samples_seen", "offsets"):
        assert digests[0][key] == digests[1][key], key


def test_two_ranks_split_the_partitions_keep_one_model_and_resume_exactly_once(broker, tmp_path):
    from kafka import KafkaConsumer
    bootstrap, n1, n2, n = broker.bootstrap, 200, 280, 360
    _create_topic(bootstrap)
    # 1. two ranks join the group; the samples go out once the group has split the partitions
    t0, port = time.monotonic(), free_port()
    procs = [_launch(bootstrap, tmp_path, r, port, max_samples=n1) for r in range(2)]
    try:
        _wait_split(procs, tmp_path)
        produce(bootstrap, range(1, n1 + 1))
    finally:
        _finish(procs, tmp_path)
    first_s = time.monotonic() - t0
    digests = _digests(tmp_path)
    assert all(d["local_samples"] > 0 for d in digests), digests          # both ranks trained
    assert not set(digests[0]["local_partitions"]) & set(digests[1]["local_partitions"])   # disjoint partitions
    assert sum(d["local_samples"] for d in digests) == n1 == digests[0]["samples_seen"]
    _same_model(digests)                                                    # one model on both ranks
    assert sorted(_audit_ids(tmp_path)) == list(range(1, n1 + 1))
    # 2. whole-job restart; while both ranks train, a third member joins the group (every member
    # revokes: collective rebalance checkpoints), then SIGTERM to rank 0 alone stops both ranks
    t0 = time.monotonic()
    for r in range(2):
        (tmp_path / f"rank{r}.log").unlink()
    procs = [_launch(bootstrap, tmp_path, r, port, max_samples=0) for r in range(2)]
    other_ids: list[int] = []
    try:
        _wait_split(procs, tmp_path)
        produce(bootstrap, range(n1 + 1, n2 + 1))
        wait_until(lambda: len(_audit_ids(tmp_path)) > n1, what="the restarted ranks to train")
        other = KafkaConsumer(TOPIC_SAMPLES, bootstrap_servers=bootstrap, group_id="dist-learners",
                              auto_offset_reset="earliest", enable_auto_commit=False, heartbeat_interval_ms=200,
                              session_timeout_ms=10_000)

        def poll_other() -> None:
            # a poll timeout longer than a rebalance (kafka-python 3.0.12 can drop a JoinGroup
            # answer when poll() times out mid-rejoin; tests/broker/test_group_clients.py)
            for recs in other.poll(timeout_ms=5000).values():
                other_ids.extend(int.from_bytes(r.value[8:16], "little") for r in recs)   # impression_id

        try:
            wait_until(lambda: (poll_other() or True) and bool(other.assignment()), timeout_s=40,
                       what="the third member to get partitions")
            produce(bootstrap, range(n2 + 1, n + 1))
            wait_until(lambda: (poll_other() or True) and len(_audit_ids(tmp_path)) + len(other_ids) >= n,
                       timeout_s=40, what="the ranks and the third member to consume everything")
        finally:
            other.close()
        procs[0].send_signal(signal.SIGTERM)
        _finish(procs, tmp_path)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    second_s = time.monotonic() - t0
    # both ranks gave partitions up through the collective barrier (and committed them), and the
    # SIGTERM that only rank 0 received stopped rank 1 as well
    for r in range(2):
        assert "revoke commit offsets=" in (tmp_path / f"rank{r}.log").read_text(), _logs(tmp_path)
    assert "signal received signal=SIGTERM" in (tmp_path / "rank0.log").read_text()
    digests = _digests(tmp_path)
    _same_model(digests)
    trained = _audit_ids(tmp_path)
    assert digests[0]["samples_seen"] == len(trained)
    # exactly once across the restart and the rebalance: ranks' audit logs + the third member's reads
    assert sorted(trained + other_ids) == list(range(1, n + 1))
    # rank 0 published the last checkpoint (cut at the stop, or earlier when nothing was trained
    # after it); its offsets cover every partition
    _, path, state = CheckpointStore(tmp_path / "ckpt").load_newest()
    # ("time": the 10 s checkpoint came after the last minibatch, so the stop had nothing left to cut)
    assert state["learner"]["reason"] in ("final", "rebalance", "steps", "time")
    assert state["samples_seen"] == len(trained)
    assert state["learner"]["world_size"] == 2 and len(state["learner"]["audit_bytes_by_rank"]) == 2
    ckpt_offsets = from_source_offsets(TOPIC_SAMPLES, state["source_offsets"])
    assert set(ckpt_offsets) == set(range(N_PARTITIONS))
    assert {int(p): o for p, o in digests[0]["offsets"].items()} == ckpt_offsets
    versions = read_versions(bootstrap, expect_at_least=2)
    assert versions[-1].samples_seen == len(trained) and versions[-1].path == str(path.resolve())
    fresh = Trainer(TrainerConfig(model="dumn", device="cpu", window=200, cumulative_bins=100), tiny_config("dumn"))
    fresh.load_checkpoint_state(load_checkpoint(path))
    assert state_digest(fresh.model) == digests[0]["model_sha256"]
    print(f"two ranks: {n1} samples, launch to exit {first_s:.1f}s; restart + rebalance + SIGTERM "
          f"{second_s:.1f}s ({len(trained) - n1} trained, {len(other_ids)} read by the third member, "
          f"rebalance checkpoint cut: {'reason=rebalance' in _logs(tmp_path)})")
