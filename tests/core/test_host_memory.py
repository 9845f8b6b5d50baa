"""host_memory: a CPU step's freed buffers are reused instead of page-faulted in again, in the main thread
(keep_freed_memory) and in every thread of a process started with compute_process_env()."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from wombat_core.host_memory import COMPUTE_TUNABLES, compute_process_env

# A step's shape: 192 MiB of 8 MiB buffers (activations, gradients) and a 96 MiB vocabulary-sized one,
# allocated, then freed together, 10 times after a first; prints the minor page faults that took. With
# glibc's defaults the big one is a fresh mapping every time and the freed heap top goes back to the
# kernel (its trim threshold is at most 64 MiB), so every step faults much of its memory in again.
PROBE = """
import resource, sys, threading, torch
from wombat_core.host_memory import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
def step():
    activations = [torch.ones(2 * 1024 * 1024) for _ in range(24)]  # 24 x 8 MiB, freed together
    logits = torch.ones(24 * 1024 * 1024)  # 96 MiB: above any mmap threshold glibc accepts
    del activations, logits
def steps():
    step()  # the first step faults its memory in either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
if sys.argv[2] == "thread":  # as Ray Train runs the training loop
    worker = threading.Thread(target=steps)
    worker.start()
    worker.join()
else:
    steps()
"""


def _faults(mode: str, where: str = "main", env: dict[str, str] | None = None) -> int:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | (env or {})
    out = subprocess.run([sys.executable, "-c", PROBE, mode, where], capture_output=True, text=True, check=True,
                         env=environ)  # fmt: skip
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tunables are Linux-only")
def test_kept_memory_takes_far_fewer_page_faults_than_glibc_defaults():
    default, kept = _faults("default"), _faults("kept")
    # A step is ~74,000 pages. Measured over the 10 steps: ~344,000 faults with the defaults, ~43,000 kept.
    assert default > 200_000
    assert kept < default / 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tunables are Linux-only")
def test_a_process_started_with_the_compute_env_keeps_memory_in_its_threads_too():
    """Ray Train runs the loop in a thread, whose own arena unmaps its heaps whenever they empty: only the
    tunables a process starts with (one arena) keep that memory."""
    default, kept = _faults("default", "thread"), _faults("default", "thread", compute_process_env({}))
    assert default > 200_000
    assert kept < default / 4


LOADER = Path("/lib64/ld-linux-x86-64.so.2")  # glibc's dynamic loader, which reports the tunables it read


@pytest.mark.skipif(not LOADER.exists(), reason="needs glibc's x86-64 loader (--list-tunables)")
def test_an_operators_own_tunables_win_over_the_compute_env():
    assert compute_process_env({}) == {"GLIBC_TUNABLES": COMPUTE_TUNABLES}
    env = compute_process_env({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4096"})

    def tunables(environ: dict[str, str]) -> str:
        return subprocess.run([str(LOADER), "--list-tunables"], capture_output=True, text=True, check=True,
                              env=environ).stdout  # fmt: skip

    assert "glibc.malloc.trim_threshold: 0x1000 " in tunables(env)  # the operator's, not our 1 GiB
    assert "glibc.malloc.mmap_max: 0 " in tunables(env)  # ours, where the operator set nothing
    assert "glibc.malloc.trim_threshold: 0x40000000 " in tunables(compute_process_env({}))
