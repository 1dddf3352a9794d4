"""Complete, atomic, verified checkpoints of the continuous learner.

A checkpoint is one file holding a dict of tensors and plain values: model ``state_dict`` (DUMN's
user memory is the buffer ``memory.memory`` inside it), optimizer state, objective state (CLSD's
warm-up counter ``n_seen`` and AdGate), metric accumulators, the configs
(``dataclasses.asdict``), ``step``, ``samples_seen``, ``source_offsets`` (where in the stream the
next sample comes from) and the torch RNG state (the CPU one, and the device's on CUDA). The trainer assembles the dict
(:meth:`learner.trainer.Trainer.checkpoint_state`); this module writes and reads it.

File layout: ``MAGIC`` (8 bytes) | version u32 | payload length u64 | sha256(payload) (32 bytes) |
payload (``torch.save`` of the dict). Saving writes a temporary file in the same directory,
fsyncs it, renames it over the target and fsyncs the directory, so a crash leaves either the old
or the new checkpoint, never a mix. Loading checks the header, the length and the digest before
``torch.load(..., weights_only=True)``; anything else raises :class:`CheckpointError`.

>>> import tempfile, os
>>> d = tempfile.mkdtemp()
>>> save_checkpoint(os.path.join(d, "c.pt"), {"step": 3, "w": torch.ones(2)})
>>> load_checkpoint(os.path.join(d, "c.pt"))["step"]
3
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch

from learner import LearnerError

logger = logging.getLogger(__name__)

MAGIC = b"SRLCKPT\x00"
VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")


class CheckpointError(LearnerError):
    """A checkpoint file is missing, truncated, corrupt, of another format or of another run's config.

    Restart from an older checkpoint or from the start of the stream; do not edit the file.
    """


def temp_path(path: Path, pid: int | None = None) -> Path:
    """Where process ``pid`` (default: this one) writes ``path`` before renaming it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid() if pid is None else pid}")


TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")  # temp_path's names


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file + fsync + rename + directory fsync)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = _HEADER.pack(MAGIC, VERSION, len(payload), hashlib.sha256(payload).digest())
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    logger.info("checkpoint saved path=%s bytes=%d step=%s", path, _HEADER.size + len(payload), state.get("step"))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`; CheckpointError otherwise."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {exc}") from None
    if len(data) < _HEADER.size:
        raise CheckpointError(f"checkpoint {str(path)!r} truncated: {len(data)} bytes < {_HEADER.size}-byte header")
    magic, version, n, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CheckpointError(f"{str(path)!r} is not a streamrec learner checkpoint (magic {magic!r})")
    if version != VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has version {version}; this build reads {VERSION}")
    payload = data[_HEADER.size:]
    if len(payload) != n:
        raise CheckpointError(f"checkpoint {str(path)!r} truncated or padded: payload {len(payload)} bytes, "
                              f"header says {n}")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: sha256 mismatch")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # a verified payload that still does not load: a foreign or unsafe object
        raise CheckpointError(f"checkpoint {str(path)!r} does not load: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a dict")
    logger.info("checkpoint loaded path=%s step=%s", path, state.get("step"))
    return state


def checkpoint_seq_len(state: dict[str, Any]) -> int | None:
    """The sequence length T the checkpoint was trained with, when it records one
    (``state["seq_len"]`` or ``state["config"]["data"]["seq_len"]``)."""
    t = state.get("seq_len")
    if t is None:
        data = (state.get("config") or {}).get("data")
        t = data.get("seq_len") if isinstance(data, dict) else None
    return None if t is None else int(t)


def require_seq_len(state: dict[str, Any], seq_len: int, where: str) -> None:
    """Refuse to continue a checkpoint trained with another T (DUMN scales attention by T, and the
    scorer builds its batches with the recorded one)."""
    t = checkpoint_seq_len(state)
    if t is not None and t != seq_len:
        raise CheckpointError(f"{where} was trained with seq_len={t}, this run has seq_len={seq_len}")


__all__ = ["CheckpointError", "checkpoint_seq_len", "load_checkpoint", "require_seq_len", "save_checkpoint"]
