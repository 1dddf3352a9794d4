"""The C allocator setting of processes that decode samples in batches (``learner``,
``train-offline``).

Each ``streams.samples.decode_batch`` call returns fresh (B, T) matrices, tens of MB per batch of
4096. With glibc's defaults the freed blocks go back to the OS (large blocks are mmap-ed, the heap
top is trimmed), so every batch pays its page faults again: ``scripts/bench_samples.py`` decodes
about 300K mixed samples/s per core that way, and about 500K once glibc keeps the memory
(docs/benchmarks.md). :func:`keep_freed_memory` sets, through ``mallopt``, a 32 MiB mmap threshold
(glibc's upper limit for it) and a 1 GiB trim threshold: the process keeps up to 1 GiB of freed
heap for reuse instead of returning it, a higher but steady RSS.

Left alone when the process is not on glibc, when ``MALLOC_MMAP_THRESHOLD_`` or
``MALLOC_TRIM_THRESHOLD_`` is set (the operator chose), or with ``STREAMREC_MALLOC_TUNING=0``.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc: mallopt refuses more
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory(environ: dict[str, str] | None = None) -> str:
    """Apply the setting (see the module docstring); returns what was done, for the log."""
    env = os.environ if environ is None else environ
    if env.get("STREAMREC_MALLOC_TUNING", "1") == "0":
        return "off (STREAMREC_MALLOC_TUNING=0)"
    if "MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env:
        return "left to the MALLOC_* environment"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: unchanged"
    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    except (OSError, AttributeError) as exc:
        return f"unchanged ({exc})"
    if not ok:
        return "unchanged (mallopt refused)"
    return f"mmap_threshold={MMAP_THRESHOLD} trim_threshold={TRIM_THRESHOLD}"


def apply_for_decoding() -> None:
    """:func:`keep_freed_memory`, logged (``malloc_tuning ...``)."""
    logger.info("malloc_tuning %s", keep_freed_memory())
