"""``streamrec train-offline``: metrics JSON + checkpoint; a resumed process equals one uninterrupted run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from learner.checkpoint import load_checkpoint
from streamrec.cli import main
from tests.learner.test_data import make_samples_file

ROOT = Path(__file__).resolve().parents[1]
TOML = """
[train_offline]
window = 100
curve_every = 2

[train_offline.model]
n_slots = 8
slot_dim = 8
controller_dim = 16
mlp_dims = [16]

[train_offline.model.embedding]
dim = 8
item_buckets = 512
category_buckets = 64
user_buckets = 256
profile_buckets = 64
"""


def cli(tmp_path: Path, out: str, *extra: str, warmup: str | None = "100", seq_len: str = "8",
        status: int = 0) -> dict | str:
    """Metrics JSON of a run; its stderr when ``status`` is not 0."""
    cmd = [sys.executable, "-m", "streamrec.cli", "--config", str(tmp_path / "t.toml"), "train-offline",
           "--samples", str(tmp_path / "s.bin"), "--out", str(tmp_path / out), "--model", "dumn",
           "--objective", "clsd", *(["--clsd-warmup-samples", warmup] if warmup else []), "--batch-size", "32",
           "--seq-len", seq_len, "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == status, proc.stderr[-2000:]
    return json.loads((tmp_path / out / "metrics.json").read_text()) if status == 0 else proc.stderr


@pytest.fixture()
def setup(tmp_path):
    make_samples_file(tmp_path / "s.bin", 256, seed=31)
    (tmp_path / "t.toml").write_text(TOML)
    return tmp_path


def test_resume_in_a_fresh_process_equals_one_run(setup):
    full = cli(setup, "full")
    part = cli(setup, "part", "--max-samples", "96")
    assert part["samples_seen"] == 96
    rest = cli(setup, "rest", "--resume", str(setup / "part" / "checkpoint.pt"))
    assert rest["samples_seen"] == full["samples_seen"] == 256
    assert rest["final"] == full["final"]
    assert [p["samples"] for p in rest["curve"]] == [p["samples"] for p in full["curve"]]
    np.testing.assert_equal(rest["curve"], full["curve"])
    a = load_checkpoint(setup / "full" / "checkpoint.pt")
    b = load_checkpoint(setup / "rest" / "checkpoint.pt")
    for k, v in a["model"].items():
        assert (v == b["model"][k]).all(), k
    assert a["source_offsets"] == b["source_offsets"] == {"offset_bytes": (setup / "s.bin").stat().st_size,
                                                          "messages": 256}
    assert full["config"]["model"]["n_slots"] == 8 and full["config"]["trainer"]["clsd"]["warmup_samples"] == 100


def test_resume_keeps_the_default_warm_up_and_refuses_another_seq_len(setup):
    """The default CLSD warm-up is a third of what the first run trains: a resume (which trains
    more) keeps the checkpoint's. The checkpoint records T, and a resume with another T is refused."""
    cli(setup, "part", "--max-samples", "96", warmup=None)
    ckpt = setup / "part" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    assert state["config"]["trainer"]["clsd"]["warmup_samples"] == 32 and state["seq_len"] == 8
    rest = cli(setup, "rest", "--resume", str(ckpt), warmup=None)
    assert rest["samples_seen"] == 256 and rest["config"]["trainer"]["clsd"]["warmup_samples"] == 32
    err = cli(setup, "other", "--resume", str(ckpt), warmup=None, seq_len="6", status=1)
    assert "trained with seq_len=8, this run has seq_len=6" in err


def test_bad_input_is_reported(setup, capsys):
    assert main(["train-offline", "--samples", str(setup / "missing.bin"), "--out", str(setup / "o")]) == 2
    assert main(["train-offline", "--samples", str(setup / "s.bin"), "--out", str(setup / "o"),
                 "--model", "nope"]) == 2
    assert main(["train-offline", "--samples", str(setup / "s.bin"), "--out", str(setup / "o"),
                 "--model", "din", "--no-umn"]) == 2
    (setup / "junk.pt").write_bytes(b"junk")
    assert main(["--config", str(setup / "t.toml"), "train-offline", "--samples", str(setup / "s.bin"),
                 "--out", str(setup / "o"), "--model", "dumn", "--device", "cpu",
                 "--resume", str(setup / "junk.pt")]) == 1
    assert "checkpoint" in capsys.readouterr().err
