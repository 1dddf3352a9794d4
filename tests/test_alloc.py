"""streamrec.alloc: the allocator setting of the sample-decoding commands, checked by what it is
for: freed batch buffers stay in the process instead of going back to the OS (measured as RSS in
fresh processes)."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from streamrec.alloc import keep_freed_memory

REPO_ROOT = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="mallopt is glibc's")

PROBE = """
import os, sys
import numpy as np
from streamrec.alloc import keep_freed_memory
print(keep_freed_memory(), file=sys.stderr)
page = os.sysconf("SC_PAGE_SIZE")
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page
base = rss()
kept = []
for _ in range(3):
    arrays = [np.ones(10 << 17) for _ in range(6)]  # a decoded batch's matrices: 6 x 10 MiB
    del arrays
    kept.append((rss() - base) >> 20)
print(min(kept))
"""


def kept_mib(env_extra: dict[str, str]) -> int:
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "STREAMREC_MALLOC_TUNING"}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, env={**env, **env_extra},
                         capture_output=True, text=True, timeout=60, check=True)
    return int(out.stdout.strip())


@glibc
def test_freed_batch_memory_is_kept_only_when_tuned():
    assert kept_mib({}) >= 50  # 60 MiB freed, kept for the next batch
    assert kept_mib({"STREAMREC_MALLOC_TUNING": "0"}) < 10  # glibc's defaults hand it back


def test_operator_settings_win():
    assert keep_freed_memory({"STREAMREC_MALLOC_TUNING": "0"}).startswith("off")
    assert keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "1"}).startswith("left to")
