"""glibc malloc settings that keep XLA's per-step CPU buffers mapped between steps.

On CPU, every execution of a compiled step allocates its temporary buffer (all the
step's intermediates, ~1.3 GB for bench-tiny's LoRA step) with ``posix_memalign`` from
one of XLA's worker threads, and frees it at the end. glibc serves a block that large
from a thread arena with a fresh ``mmap`` and gives it back with ``munmap``, so each
step touches ~1.3 GB of brand-new pages: 333,000 page faults and 0.6-0.9 s of kernel
time per step on a 2-core AVX-512 EPYC (benchmarks/RESULTS.md, issue #20).

:func:`keep_freed_memory` makes every thread allocate from the main heap (one arena),
never with ``mmap``, and never trims the heap, so the second step reuses the pages the
first one faulted in: 0 faults per step, the LoRA step ~10% and the full fine-tuning
step ~13% faster there. The cost is resident memory that no longer shrinks: freed
blocks stay mapped (with full fine-tuning of bench-tiny, peak RSS 2.6 -> 4.0 GB; with
LoRA it fell, 2.4 -> 2.0 GB). It is what a caching allocator (jemalloc, tcmalloc, the
GPU's BFC allocator) does; XLA's CPU client has no allocator option of its own.

The ``jaxtune`` command calls it at start-up, before jax creates its threads.
``JAXTUNE_MALLOC=system`` keeps glibc's defaults. Python users call it first thing,
before importing jax, if they want the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameter numbers (malloc.h); stable glibc ABI.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

ENV = "JAXTUNE_MALLOC"


def keep_freed_memory(environ: dict | None = None) -> bool:
    """Sets glibc's malloc to keep freed memory mapped (see the module docstring).

    Takes effect for threads that have not allocated yet, so call it before jax starts
    its CPU client. Returns True when the settings were applied; False on a non-glibc
    platform (macOS, musl), when ``JAXTUNE_MALLOC=system``, or when glibc refused one.
    """
    environ = os.environ if environ is None else environ
    mode = environ.get(ENV, "keep").strip().lower()
    if mode == "system" or not sys.platform.startswith("linux"):
        return False
    if mode != "keep":
        # A typo must not silently change memory behaviour either way: say so, keep going.
        print(f"warning: {ENV}={mode!r} is neither 'keep' nor 'system'; using 'keep'",
              file=sys.stderr)  # fmt: skip
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # musl has mallopt as a no-op stub
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # One arena: a thread arena serves any block larger than its 64 MiB heap with mmap,
    # whatever M_MMAP_MAX says. No mmap: large blocks come from the heap. Trim threshold
    # -1 (= SIZE_MAX, documented in mallopt(3)): the heap's top is never given back.
    ok = mallopt(M_ARENA_MAX, 1) and mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, -1)
    return bool(ok)
