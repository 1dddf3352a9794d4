"""Where the continuous learner's state lives on disk: numbered checkpoints and the audit log.

:class:`CheckpointStore` keeps ``ckpt-<version>.pt`` files (written with
:func:`learner.checkpoint.save_checkpoint`, atomic and verified) and finds the newest one that
verifies, refusing damaged ones with an error that names the file and the reason.
:class:`AuditLog` is the optional record of exactly which samples are inside the model.

>>> import tempfile
>>> store = CheckpointStore(tempfile.mkdtemp(), keep=2)
>>> for v in (1, 2, 3):
...     _ = store.save(v, {"step": v})
>>> store.prune() and store.versions()
[2, 3]
>>> store.load_newest()[2]["step"], store.next_version()
(3, 4)
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from learner.checkpoint import TEMP_NAME, CheckpointError, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

_CKPT_NAME = re.compile(r"^ckpt-(\d{8,})\.pt$")


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a save in progress: its file is left alone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointStore:
    """Numbered checkpoints ``ckpt-<version>.pt`` in one directory; keeps the newest ``keep``."""

    def __init__(self, directory: str | Path, keep: int = 3):
        self.dir = Path(directory)
        self.keep = keep
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None
        self.remove_stale_temp_files()

    def lock(self) -> None:
        """Claim the directory for this process's writes (``flock`` on ``.lock``, released by
        :meth:`close` or when the process ends). Two learners writing one directory would each
        number their checkpoints from what they saw at restore and overwrite each other's versions
        (a rolling restart that starts the new process before the old one has stopped)."""
        import fcntl
        if self._lock_fd is not None:
            return
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"checkpoint directory {str(self.dir)!r} is in use by another learner "
                                  f"(pid {holder}); stop it first, or give this one its own directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        """Release :meth:`lock` (the file stays; it is only a lock)."""
        if self._lock_fd is not None:
            fd, self._lock_fd = self._lock_fd, None
            os.close(fd)

    def remove_stale_temp_files(self) -> list[Path]:
        """Delete the temporary files of saves whose process is gone (a save killed before its
        rename leaves ``.ckpt-N.pt.tmp-PID``, as large as a checkpoint); returns them."""
        gone = []
        for p in self.dir.iterdir():
            m = TEMP_NAME.match(p.name)
            if m is None or not _CKPT_NAME.match(m["name"]):
                continue
            # this process has not saved yet (the store is made first), so its own pid is a
            # dead process's too: in a container a restarted learner often gets the same pid
            if int(m["pid"]) != os.getpid() and _alive(int(m["pid"])):
                continue
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            gone.append(p)
            logger.warning("checkpoint temp file of a dead process removed path=%s", p)
        return gone

    def versions(self) -> list[int]:
        """Version numbers of the checkpoint files present, ascending (refused files included)."""
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _CKPT_NAME.match(p.name)))

    def path(self, version: int) -> Path:
        return self.dir / f"ckpt-{version:08d}.pt"

    def next_version(self) -> int:
        found = self.versions()
        return found[-1] + 1 if found else 1

    def load_newest(self) -> tuple[int, Path, dict[str, Any]] | None:
        """(version, path, state) of the newest checkpoint that verifies; None for an empty directory.

        Raises CheckpointError when files exist but none verifies (its message says how to start afresh).
        """
        found = self.versions()
        for version in reversed(found):
            path = self.path(version)
            try:
                return version, path, load_checkpoint(path)
            except CheckpointError as exc:
                logger.error("checkpoint refused path=%s reason=%s; trying the previous one", path, exc)
        if found:
            raise CheckpointError(f"none of the {len(found)} checkpoints in {str(self.dir)!r} verifies; "
                                  "move them away to start a fresh model (it starts at the group's committed "
                                  "offsets; use a new --group to train from the beginning of the stream); its "
                                  "versions are numbered above the newest one announced for the model")
        return None

    def save(self, version: int, state: dict[str, Any]) -> Path:
        path = self.path(version)
        save_checkpoint(path, state)
        return path

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep`` checkpoints; returns the deleted paths."""
        gone = [self.path(v) for v in self.versions()[:-self.keep]]
        for p in gone:
            p.unlink(missing_ok=True)
        return gone


class AuditLog:
    """Text file, one line "partition offset sample_id" per trained sample, in training order.

    The learner records the file length in every checkpoint and cuts the file back to it on
    restart, so the file lists exactly the samples inside the restored model.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fh = None

    def open(self, keep_bytes: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a+b")
        size = self._fh.seek(0, os.SEEK_END)
        if size < keep_bytes:
            raise CheckpointError(f"audit log {str(self.path)!r} has {size} bytes, the checkpoint recorded "
                                  f"{keep_bytes}: it is not this learner's log")
        if size > keep_bytes:
            logger.info("audit log cut back path=%s from_bytes=%d to_bytes=%d", self.path, size, keep_bytes)
            self._fh.truncate(keep_bytes)
        self._fh.seek(keep_bytes)

    def append(self, partitions: np.ndarray, offsets: np.ndarray, sample_ids: np.ndarray) -> None:
        lines = "".join(f"{p} {o} {s}\n" for p, o, s in zip(partitions.tolist(), offsets.tolist(), sample_ids.tolist()))
        self._fh.write(lines.encode("ascii"))
        self._fh.flush()   # visible to readers at once; fsync waits for the checkpoint

    def sync(self) -> int:
        """Flush and fsync; returns the file length."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return self._fh.tell()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


__all__ = ["AuditLog", "CheckpointStore"]
