"""Several learner processes training one model with ``torch.distributed`` (docs/learner.md,
"Several learner processes").

Every rank is a member of the same consumer group (the group's assignment splits the partitions)
and holds a full replica of the trainer. Training runs in lockstep: each loop iteration is one
collective step, in which every rank takes part whether it holds a minibatch, nothing, or a
rebalance barrier.

One step, on every rank:

1. header: ``all_gather`` of (local sample count, rejected count, stop, rebalance barrier held,
   rank 0's "checkpoint by time", partitions touched, rank 0's durable version) on the control group;
2. offsets: ``all_gather`` of each rank's ``(partition, next offset)`` pairs; every rank applies all
   of them in rank order, so every rank holds the same global trained position;
3. when the ranks hold N > 0 samples: local score + backward (a rank without samples contributes a
   zero gradient); :class:`GradientReducer` sums ``grad_r * n_r / N`` over the ranks (the gradient of
   the mean loss over the union of the ranks' samples) and every rank steps its optimizer with it;
4. memory and metrics: ``all_gather`` of every rank's DUMN memory writes (write weights, erase, add;
   padded to the largest count) with its served scores and labels; every rank applies ALL writes
   in rank order (rank 0's samples in stream order, then rank 1's, ...) with the model's own write
   routine and feeds the same union to its metrics, so memory and metrics stay identical too.

Checkpoints are collective: rank 0 writes the file (it holds the global offsets and the common
state) and announces the version; every rank commits its own partitions once rank 0 reports the
version durable. A restart broadcasts rank 0's newest good checkpoint to every rank.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Any

import torch

from learner.checkpoint import CheckpointError, require_seq_len
from learner.continuous import ContinuousLearner, StopFlag
from learner.dist_comm import Comm, DistConfig, DistributedError
from streams.dlq import DeadLetterError
from learner.dist_ops import (GradientReducer, MemoryWrites, apply_writes, merge_memory_writes, pack_writes,
                              state_digest, stream_index_buffers, tensors_digest)
from learner.stream import RebalanceBarrier, StreamBatch, from_source_offsets, to_source_offsets

logger = logging.getLogger(__name__)

_HEADER = ("n_local", "n_rejected", "stop", "barrier", "time_due", "n_parts", "durable_version")


class DistributedLearner(ContinuousLearner):
    """:class:`ContinuousLearner` as one rank of a lockstep job (see the module docstring).

    Same constructor plus ``comm``; only rank 0 needs ``publisher``. ``n_local_samples`` and
    ``local_partitions`` count what this rank itself trained.
    """

    def __init__(self, *args, comm: Comm, dist_cfg: DistConfig = DistConfig(), **kwargs):
        super().__init__(*args, **kwargs)
        self.comm = comm
        self.dist_cfg = dist_cfg
        self.writes = MemoryWrites(self.trainer.model)
        params = [p for g in self.trainer.optimizer.param_groups for p in g["params"]]
        self.reducer = GradientReducer(params)
        self.n_local_samples = 0
        self.local_partitions: Counter[int] = Counter()
        self._audit_by_rank: list[int] = []
        self._commit_after: dict[int, dict[int, int]] = {}   # version -> offsets, until rank 0 says durable
        self._durable_version = 0                                # rank 0: newest version saved and announced

    # ---- restart ---------------------------------------------------------------------------

    def restore(self) -> int:
        """Rank 0 loads the newest good checkpoint and broadcasts it; every rank restores from it."""
        found: dict[str, Any] = {}
        if self.comm.rank == 0:
            try:   # no checkpoint: rank 0's fresh state, so that every rank starts from the same weights
                loaded = self.store.load_newest()
                found = {"loaded": None if loaded is None else [loaded[0], str(loaded[1]), loaded[2]],
                         "next_version": max(self.store.next_version(), self.version_floor + 1),
                         "initial": None if loaded else self.trainer.checkpoint_state()}
            except CheckpointError as exc:
                found = {"error": str(exc)}
        found = self.comm.broadcast_state(found)
        if "error" in found:
            raise CheckpointError(found["error"]) if self.comm.rank == 0 else DistributedError(
                f"rank 0 could not load a checkpoint: {found['error']}")
        loaded, self._version, initial = found["loaded"], found["next_version"], found["initial"]
        if loaded is None and self.comm.rank:
            self.trainer.load_checkpoint_state(initial)
        restored, audit_bytes = 0, 0
        if loaded is not None:
            restored, path, state = loaded
            meta = state.get("learner", {})
            by_rank = list(meta.get("audit_bytes_by_rank", [meta.get("audit_bytes", 0)]))
            if self.audit is not None:
                if len(by_rank) != self.comm.world_size:
                    raise DistributedError(f"checkpoint {path} was cut by {len(by_rank)} rank(s), this job has "
                                           f"{self.comm.world_size}: the per-rank audit logs cannot be matched")
                audit_bytes = int(by_rank[self.comm.rank])
            require_seq_len(state, self.stream.cfg.seq_len, str(path))
            self.trainer.load_checkpoint_state(state)
            self.offsets = from_source_offsets(self.topic, self.trainer.source_offsets)
            self.stats.version = restored
            self.stats.last_checkpoint_s = float(meta.get("created_at_ms", 0)) / 1000
            self.stream.set_positions(self.offsets, unknown="earliest")
            logger.info("recover rank=%d version=%d path=%s step=%d samples=%d offsets=%s next_version=%d",
                        self.comm.rank, restored, path, self.trainer.step, self.trainer.samples_seen, self.offsets,
                        self._version)
        else:
            self.stream.set_positions({}, unknown="committed")
            logger.info("recover rank=%d version=0 (no checkpoint): group offsets or the beginning", self.comm.rank)
        if self.audit is not None:
            self.audit.open(audit_bytes)
        self._last_ckpt_step = self.trainer.step
        self._durable_version = restored
        return restored

    # ---- the loop --------------------------------------------------------------------------

    def run(self, stop: StopFlag) -> None:
        self._last_ckpt_t = self.clock()
        self.stream.start()
        clean = False
        busy = False
        try:
            while True:
                timeout = self.dist_cfg.busy_poll_s if busy else self.dist_cfg.idle_poll_s
                item = self.stream.get(timeout_s=timeout)
                barrier = item if isinstance(item, RebalanceBarrier) else None
                batch = item if isinstance(item, StreamBatch) else None
                now = self.clock()
                time_due = (self.comm.rank == 0 and bool(self.cfg.checkpoint_every_s)
                            and now - self._last_ckpt_t >= self.cfg.checkpoint_every_s)
                header, n_total = self._step(batch, stop.is_set(), barrier is not None, time_due)
                busy = n_total > 0
                self._commit_durable(int(header[0, 6]))
                if header[:, 3].any():
                    if self._dirty:
                        self.checkpoint("rebalance", wait=True)
                    else:
                        self._sync_durable()
                    if barrier is not None:
                        barrier.reply(self.offsets)
                else:
                    every = self.cfg.checkpoint_every_steps
                    if every and self.trainer.step - self._last_ckpt_step >= every:
                        self.checkpoint("steps")
                    elif self._dirty and header[0, 4]:
                        self.checkpoint("time")
                if now - self._last_tick >= self.cfg.progress_every_s:
                    self._tick(now)
                if header[:, 2].any() or (self.cfg.max_samples and self.trainer.samples_seen >= self.cfg.max_samples):
                    break
            if self._dirty:
                self.checkpoint("final", wait=True)
            else:
                self._sync_durable()
            clean = True
        finally:
            self._close(clean)
            logger.info("learner stopped rank=%d clean=%s step=%d samples=%d local_samples=%d version=%d",
                        self.comm.rank, clean, self.trainer.step, self.trainer.samples_seen, self.n_local_samples,
                        self.stats.version)

    def _step(self, item: StreamBatch | None, stop: bool, barrier: bool, time_due: bool) -> tuple[torch.Tensor, int]:
        """One collective step (module docstring, 1-4). -> (header (world, 7), samples in the step)."""
        comm, t = self.comm, self.trainer
        n_local = item.batch.batch_size if item is not None else 0
        parts = sorted(item.next_offsets.items()) if item is not None else []
        durable = self._durable_version if comm.rank == 0 else 0
        header = comm.gather_ctrl(torch.tensor([n_local, item.n_rejected if item else 0, stop, barrier, time_due,
                                                len(parts), durable], dtype=torch.int64))  # (world, 7)
        counts = header[:, 0].tolist()
        n_total = sum(counts)
        n_parts = int(header[:, 5].max())
        if n_parts:
            mine = torch.full((n_parts, 2), -1, dtype=torch.int64)                  # (P, 2) partition, offset
            if parts:
                mine[:len(parts)] = torch.tensor(parts, dtype=torch.int64)
            for p, o in comm.gather_ctrl(mine).reshape(-1, 2).tolist():           # rank order
                if p >= 0:
                    self.offsets[int(p)] = int(o)
        if n_total:
            self._train_step(item, n_local, counts, n_total)
        t.n_rejected += int(header[:, 1].sum())
        if n_total or n_parts:
            t.source_offsets = to_source_offsets(self.topic, self.offsets)
            self._dirty = True
        return header, n_total

    def _train_step(self, item: StreamBatch | None, n_local: int, counts: list[int], n_total: int) -> None:
        comm, t = self.comm, self.trainer
        first = sum(counts[:comm.rank])
        index_bufs = stream_index_buffers(t.objective)
        starts = [int(b) for b in index_bufs]
        served = torch.empty(0, device=t.device)
        labels = torch.empty(0, 2, device=t.device)
        users = torch.empty(0, dtype=torch.int64, device=t.device)
        loss = 0.0
        if n_local:
            batch = item.batch
            batch = batch.to(t.device, non_blocking=True) if batch.device != t.device else batch
            self._note_freshness(int(self.clock() * 1000) - item.timestamps_ms)     # (B,)
            for b, s in zip(index_bufs, starts):   # this rank's samples sit at [first, first + n) of the step
                b.fill_(s + first)
            served, loss_t = t.forward_backward(batch)                               # (B,), ()
            loss = float(loss_t)
            labels = torch.stack([batch.clicked.float(), batch.valid_read.float()], -1)  # (B, 2)
            users = batch.user_id
            self.n_local_samples += n_local
            self.local_partitions.update(item.partitions.tolist())
            if self.audit is not None:
                self.audit.append(item.partitions, item.offsets, item.batch.sample_id.cpu().numpy())
        else:
            t.optimizer.zero_grad(set_to_none=True)
        for b, s in zip(index_bufs, starts):
            b.fill_(s + n_total)
        mean_loss = self.reducer.reduce(comm, n_local, n_total, loss)
        t.optimizer.step()
        for i, memory in enumerate(self.writes.memories):
            merge_memory_writes(comm, memory, pack_writes(memory, self.writes.take(i), n_local), counts)
        n_max = max(counts)
        rows = torch.zeros(n_max, 3, device=t.device)                                # (n_max, 3) score, clicked, vr
        rows[:n_local, 0] = served.float()
        rows[:n_local, 1:] = labels
        ids = torch.zeros(n_max, dtype=torch.int64, device=t.device)                 # (n_max,)
        ids[:n_local] = users
        all_rows = torch.cat([r[:c] for r, c in zip(comm.gather_data(rows), counts)])  # (N, 3)
        all_ids = torch.cat([u[:c] for u, c in zip(comm.gather_data(ids), counts)])    # (N,)
        t.record(all_rows[:, 0], all_rows[:, 1], all_rows[:, 2], all_ids, mean_loss)

    # ---- checkpoints -----------------------------------------------------------------------

    flush_dead_letters_on_write = False  # checkpoint() flushes each rank's before the collective

    keep_start_positions = False

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"world_size": self.comm.world_size, "audit_bytes_by_rank": list(self._audit_by_rank)}

    def checkpoint(self, reason: str, wait: bool = False) -> int:
        """Collective: every rank syncs its audit log and checks that its state digest matches rank
        0's; rank 0 cuts and writes the checkpoint; with ``wait`` every rank returns only once it is
        durable. Every rank then commits its own partitions (now or when rank 0 reports durable)."""
        # each rank its own dead letters, before any rank's offsets are saved or committed; a
        # failure is shared through the collective below, so that every rank stops (a rank
        # raising alone would leave the others waiting in it until the timeout)
        try:
            self.flush_dead_letters()
            flush_error = None
        except Exception as exc:
            flush_error = exc
        audit_bytes = self.audit.sync() if self.audit is not None else 0
        digest = int(state_digest(self.trainer.model)[:15], 16)
        gathered = self.comm.gather_ctrl(torch.tensor([audit_bytes, digest, flush_error is not None],
                                                      dtype=torch.int64))                # (world, 3)
        failed = [r for r, bad in enumerate(gathered[:, 2].tolist()) if bad]
        if failed:
            raise DeadLetterError(f"checkpoint refused: dead letters of rank(s) {failed} were not acknowledged"
                                  + (f" (here: {flush_error!r})" if flush_error is not None else "")) from flush_error
        if len(set(gathered[:, 1].tolist())) != 1:
            raise DistributedError(f"ranks diverged at step {self.trainer.step}: "
                                   f"state digests {gathered[:, 1].tolist()}")
        self._audit_by_rank = gathered[:, 0].tolist()
        offsets = dict(self.offsets)
        if self.comm.rank == 0:
            version = super().checkpoint(reason, wait=wait)
        else:
            version = self._version
            self._version += 1
            self._dirty = False
            self._last_ckpt_step = self.trainer.step
            self._last_ckpt_t = self.clock()
            self.stream.set_positions(offsets)
            self._commit_after[version] = offsets
        if wait:
            self._sync_durable()
        return version

    def _sync_durable(self) -> None:
        """Rank 0 finishes its write; every rank learns it is durable and commits what it may."""
        if self.comm.rank == 0:
            self.wait_for_writes()
        durable = self.comm.broadcast_int(self._durable_version)
        self._commit_durable(durable)

    def _write(self, version: int, *args) -> None:
        super()._write(version, *args)
        self._durable_version = version

    def _commit_durable(self, durable_version: int) -> None:
        if self.comm.rank == 0:
            return                                  # rank 0 commits on its writer thread
        self.stats.version = max(self.stats.version, durable_version)
        done = [v for v in self._commit_after if v <= durable_version]
        if done:
            self.stream.request_commit(self._commit_after[max(done)])
            for v in done:
                del self._commit_after[v]

    def digest(self) -> dict[str, Any]:
        """This rank's view, for comparing ranks: state hashes, counts, partitions it trained."""
        t = self.trainer
        opt = ((f"{i}.{k}", v) for i, st in t.optimizer.state_dict()["state"].items()
               for k, v in st.items() if isinstance(v, torch.Tensor))
        return {"rank": self.comm.rank, "world_size": self.comm.world_size, "samples_seen": t.samples_seen,
                "steps": t.step, "local_samples": self.n_local_samples,
                "local_partitions": {str(p): n for p, n in sorted(self.local_partitions.items())},
                "model_sha256": state_digest(t.model), "memory_sha256": state_digest(t.model, only="memory"),
                "optimizer_sha256": tensors_digest(opt),
                "offsets": {str(p): o for p, o in sorted(self.offsets.items())}, "version": self.stats.version,
                "config": dataclasses.asdict(self.dist_cfg), "time_s": time.time()}


__all__ = ["Comm", "DistConfig", "DistributedError", "DistributedLearner", "GradientReducer", "MemoryWrites",
           "apply_writes", "merge_memory_writes", "pack_writes", "state_digest"]
