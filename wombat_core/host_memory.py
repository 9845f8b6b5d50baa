"""Keep freed host memory for reuse in processes that compute on the CPU (glibc malloc's tunables).

A training step on the CPU allocates and frees the same activation and gradient buffers every step. With
glibc's defaults a buffer above the mmap threshold (128 KiB, raised after a free up to 32 MiB) is a fresh
`mmap`, and so is every vocabulary-sized one (an RRHF step's logits, their log-softmax and gradients are
~100 MiB each), and the heap is trimmed back to the kernel once 64 MiB sit free at its top: either way
the next step takes a page fault and a zeroed page for every 4 KiB it touches, and in a VM a page the
guest gave back can cost a fault on the host too. Here malloc never maps (`M_MMAP_MAX` 0: every buffer
comes from a heap) and trims only above 1 GiB.
Measured on SmolLM2-135M (8 RRHF steps of 4 responses, 2 cores, model load included): 2.2 M page faults,
8-10 s of system time and a 1.37-1.63 s step with the defaults; 0.8 M, 5 s and 1.17-1.18 s kept.
(PyTorch's CPU performance guide makes the same point by recommending jemalloc or tcmalloc, which a pip
install cannot bring.)

Threads need more: glibc gives each thread its own arena, whose heaps (64 MiB at most) are unmapped
whenever they empty, whatever the trim threshold, and Ray Train runs the training loop in a thread of
its worker. The same step in a thread took 1.38-1.48 s, and 0.98 s with one arena and no mmap. The
arena count is fixed when a process first needs a second arena, so it cannot be changed from inside a
running worker: processes started to compute get `compute_process_env()` (glibc's tunables, read at
start), and a process already running calls `keep_freed_memory()` (enough for its main thread).

Whoever starts a process decides, never a library call deep inside it: the RRHF service gives its CPU
training workers and CPU scorer replicas the environment, and the benchmark's baseline calls
`keep_freed_memory()`. The cost: up to 1 GiB of freed memory held back from the kernel, a heap that
returns memory only from its top, and one arena's lock shared by every thread. Transparent huge pages
were tried too: with `defrag=madvise` (this machine, and the common default) the faults fall to 0.5 M
but direct compaction makes the step slower (1.76 s).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
TRIM_THRESHOLD = 1024 * 1024 * 1024
COMPUTE_TUNABLES = (
    f"glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"
)


def compute_process_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables for a process started to compute on the CPU: glibc's malloc tunables (one
    arena, no mmap, trimming above 1 GiB), followed by any the environment already sets: glibc applies
    them in order, so an operator's own setting wins."""
    current = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    return {"GLIBC_TUNABLES": f"{COMPUTE_TUNABLES}:{current}" if current else COMPUTE_TUNABLES}


@functools.cache
def keep_freed_memory() -> bool:
    """Makes glibc's malloc in this process serve every buffer from its heap and keep freed memory. False
    (and nothing changed) where the C library is not glibc (musl, macOS): no `mallopt`, or one that ignores
    everything."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only; musl has a mallopt that ignores everything
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    applied = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not applied:
        log.warning("glibc refused the malloc settings; CPU steps will page-fault more")
    return applied
