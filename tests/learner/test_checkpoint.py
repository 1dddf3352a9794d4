"""Checkpoints: a resumed run equals an uninterrupted one; damaged files are refused."""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

from learner.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from learner.config import CLSDConfig
from learner.data import DataConfig, SampleLoader
from learner.trainer import Trainer, TrainerConfig
from tests.learner.conftest import tiny_config
from tests.learner.test_data import make_samples_file

B = 32


class Unsafe:
    """An arbitrary class: ``torch.load(weights_only=True)`` must refuse to build it."""


@pytest.fixture(scope="module")
def samples_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "s.bin"
    make_samples_file(path, 480, seed=21)
    return str(path)


def make_trainer(objective="clsd", seed=0, model="dumn"):
    # warm-up ends at sample 200, after the interruption at 160: the counter must survive the checkpoint
    cfg = TrainerConfig(model=model, objective=objective, seed=seed, device="cpu", window=100, curve_every=2,
                        keep_predictions=True, clsd=CLSDConfig(warmup_samples=200))
    return Trainer(cfg, tiny_config(model, heads=cfg.heads))


def loader(path, **kw):
    return SampleLoader(DataConfig(path, batch_size=B, seq_len=8, **kw))


@pytest.mark.parametrize("objective", ["clsd", "mtl_clsd"])
def test_resume_equals_uninterrupted_run(samples_path, tmp_path, objective):
    full = make_trainer(objective)
    want = full.run(loader(samples_path))

    first = make_trainer(objective)
    first.run(loader(samples_path, max_samples=160))
    assert int(first.objective.terms["clsd"].n_seen) == 160
    save_checkpoint(tmp_path / "c.pt", first.checkpoint_state())
    state = load_checkpoint(tmp_path / "c.pt")
    assert "memory.memory" in state["model"]                              # DUMN memory is model state
    assert state["source_offsets"]["messages"] == 160

    resumed = Trainer(first.cfg, first.model_config)
    with torch.no_grad():                                                 # disturb it: everything must come back
        for t in [*resumed.model.state_dict().values(), *resumed.objective.state_dict().values()]:
            t.add_(1) if t.is_floating_point() else t.fill_(7)
    resumed.load_checkpoint_state(state)
    assert torch.equal(resumed.model.memory.memory, first.model.memory.memory)
    assert int(resumed.objective.terms["clsd"].n_seen) == 160
    got = resumed.run(loader(samples_path, start_offset_bytes=state["source_offsets"]["offset_bytes"]))

    assert got.samples_seen == want.samples_seen == 480 and got.steps == want.steps
    np.testing.assert_array_equal(got.predictions["scores"], want.predictions["scores"][160:])
    np.testing.assert_equal(got.final, want.final)
    np.testing.assert_equal(got.curve, want.curve)                        # NaN-aware
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(full.objective.state_dict().items(), resumed.objective.state_dict().items()):
        assert torch.equal(a, b), name


def test_interrupted_run_differs_without_optimizer_state(samples_path, tmp_path):
    """The comparison above can fail: dropping the Adam moments changes the continuation."""
    full = make_trainer("bce", model="din")
    want = full.run(loader(samples_path))
    first = make_trainer("bce", model="din")
    first.run(loader(samples_path, max_samples=160))
    state = first.checkpoint_state()
    state["optimizer"] = torch.optim.Adam(first.model.parameters(), lr=first.cfg.lr).state_dict()
    resumed = Trainer(first.cfg, first.model_config)
    resumed.load_checkpoint_state(state)
    got = resumed.run(loader(samples_path, start_offset_bytes=state["source_offsets"]["offset_bytes"]))
    assert not np.array_equal(got.predictions["scores"], want.predictions["scores"][160:])


def _saved(tmp_path):
    t = make_trainer("bce", model="din")
    t.run(loader(str(tmp_path / "s.bin"), max_samples=64))
    path = tmp_path / "c.pt"
    save_checkpoint(path, t.checkpoint_state())
    return t, path


def test_corrupt_truncated_and_foreign_files_are_refused(tmp_path):
    make_samples_file(tmp_path / "s.bin", 64, seed=5)
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    load_checkpoint(path)                                                 # the intact file loads
    cases = {
        "truncated": data[: len(data) // 2],
        "header only": data[:20],
        "flipped": data[:-100] + bytes([data[-100] ^ 1]) + data[-99:],
        "padded": data + b"\0",
        "foreign": b"PK\x03\x04" + data[4:],
        "empty": b"",
    }
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.pt"
        bad.write_bytes(blob)
        with pytest.raises(CheckpointError):
            load_checkpoint(bad)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing.pt")


def test_plain_torch_save_is_refused_and_unsafe_payload_refused(tmp_path):
    torch.save({"step": 1}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "plain.pt")

    save_checkpoint(tmp_path / "evil.pt", {"x": Unsafe()})                # not loadable with weights_only
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pt")


def test_checkpoint_of_other_config_refused(tmp_path):
    make_samples_file(tmp_path / "s.bin", 64, seed=5)
    t, path = _saved(tmp_path)
    other = Trainer(TrainerConfig(model="din", objective="bce", seed=0, device="cpu", window=100, lr=0.01,
                                  keep_predictions=True), tiny_config("din"))
    with pytest.raises(CheckpointError):
        other.load_checkpoint_state(load_checkpoint(path))


def test_a_restore_may_change_how_a_run_executes_not_what_it_learns(tmp_path):
    """Device, logging, curve spacing, kept predictions, the cumulative GAUC, and the CLSD settings of
    an objective without CLSD may differ; learning settings may not."""
    make_samples_file(tmp_path / "s.bin", 64, seed=5)
    t, path = _saved(tmp_path)                          # bce, din, device "cpu", cumulative GAUC kept
    state = load_checkpoint(path)
    run = dataclasses.replace(t.cfg, device="auto", log_every_s=1.0, curve_every=7, keep_predictions=False,
                              cumulative_gauc=False, clsd=CLSDConfig(warmup_samples=5, alpha=0.3))
    other = Trainer(run, tiny_config("din"))
    other.load_checkpoint_state(state)
    assert other.step == t.step and math.isnan(other.metrics.compute()["cum_click_gauc"])
    for change in ({"lr": 0.01}, {"seed": 1}, {"window": 50}, {"separate_eval_pass": True}):
        with pytest.raises(CheckpointError, match="another config"):
            Trainer(dataclasses.replace(run, **change), tiny_config("din")).load_checkpoint_state(state)
    clsd = make_trainer("clsd", model="din")            # with CLSD its settings count
    clsd_state = clsd.checkpoint_state()
    with pytest.raises(CheckpointError, match="another config"):
        Trainer(dataclasses.replace(clsd.cfg, clsd=CLSDConfig(warmup_samples=5)),
                tiny_config("din")).load_checkpoint_state(clsd_state)


def test_save_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"step": 1})
    with pytest.raises(Exception):
        save_checkpoint(path, {"step": 2, "bad": lambda: None})           # cannot be pickled
    assert load_checkpoint(path)["step"] == 1                             # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]        # no temp file left behind


def test_store_removes_temp_files_of_saves_whose_process_died(tmp_path):
    """A save killed before its rename leaves a temp file as large as a checkpoint; a store opened
    later removes those of dead processes and leaves a live process's save alone."""
    import os
    import subprocess
    import sys

    from learner.checkpoint_store import CheckpointStore

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".ckpt-00000003.pt.tmp-{dead_pid}"
    live = tmp_path / f".ckpt-00000004.pt.tmp-{os.getppid()}"        # a live process (this one's parent)
    own = tmp_path / f".ckpt-00000005.pt.tmp-{os.getpid()}"          # a dead one's, under a reused pid
    other = tmp_path / "notes.tmp-1"
    for p in (stale, live, own, other):
        p.write_bytes(b"x" * 100)
    store = CheckpointStore(tmp_path)
    assert not stale.exists() and not own.exists() and live.exists() and other.exists()
    assert store.remove_stale_temp_files() == []  # done once, at the start
    assert store.versions() == []


def test_a_checkpoint_directory_takes_one_writer_at_a_time(tmp_path):
    """A second learner on the same directory (a rolling restart's new process while the old one
    still runs) is refused instead of overwriting the first one's versions."""
    from learner.checkpoint_store import CheckpointStore

    first, second = CheckpointStore(tmp_path), CheckpointStore(tmp_path)
    first.lock()
    with pytest.raises(CheckpointError, match=f"in use by another learner \\(pid {os.getpid()}\\)"):
        second.lock()
    assert second.versions() == []                   # reading needs no lock
    first.close()
    second.lock()                                    # free again once the first one let go
    second.close()
