"""jaxtune.malloc: a large block freed by a worker thread is reused without page faults.

Each case runs in a fresh interpreter (mallopt must precede the threads' first
allocation), which allocates a 256 MiB block in a worker thread the way XLA's CPU
client allocates a step's temporary buffer, touches every page, frees it, and does it
again; the page faults of the second round tell whether the pages stayed mapped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc malloc settings (Linux only)"
)

PROBE = r"""
import ctypes, json, resource, sys, threading
from jaxtune.malloc import keep_freed_memory
applied = keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
SIZE = 256 << 20
faults = []

def one_step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(SIZE)
    ctypes.memset(p, 1, SIZE)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

for _ in range(2):  # a new thread each round, like a step running on a pool thread
    t = threading.Thread(target=one_step)
    t.start()
    t.join()
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _probe(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JAXTUNE_MALLOC"}
    if env_value is not None:
        env["JAXTUNE_MALLOC"] = env_value
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True
    )
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "stderr": out.stderr}


def test_kept_memory_is_reused_without_faults():
    pages = (256 << 20) // 4096
    kept = _probe(None)
    assert kept["applied"] is True
    assert kept["faults"][0] > pages // 2  # the first round maps fresh pages
    assert kept["faults"][1] < pages // 100  # the second reuses them
    system = _probe("system")
    assert system["applied"] is False
    # glibc's defaults: the block is mmap'd and munmap'd each time, so it faults again.
    assert system["faults"][1] > pages // 2


def test_unknown_value_warns_and_keeps():
    # Not in this process: the settings would stay for the rest of the test session.
    out = _probe("jemalloc")
    assert out["applied"] is True
    assert "JAXTUNE_MALLOC='jemalloc' is neither 'keep' nor 'system'" in out["stderr"]
