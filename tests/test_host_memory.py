"""Host memory reuse: after retain_freed_memory(), large blocks freed and allocated again come back
without the kernel faulting their pages in again; with the opt-out they fault them all."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from saelab.utils.host_memory import RETAIN_ENV

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# In a child: the setting is for the whole process and stays.
_CHILD = """
import resource, torch
from saelab.utils.host_memory import retain_freed_memory
tuned = retain_freed_memory()

def faults_of_a_fresh_block():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2**20 // 4).fill_(1.0)  # 64 MB, above the 32 MB glibc ever serves from its heap by default
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

# The first blocks fault in either way: the aligned request is a few bytes larger than the block
# freed, and the heap grows until freed blocks lie side by side (here within 6 rounds; 13 allowed).
faults = [faults_of_a_fresh_block() for _ in range(16)]
print(tuned, sum(faults[-3:]))
"""
PAGES = 64 * 2**20 // 4096
# A malloc preloaded in glibc's place, or glibc's own environment settings, would decide instead.
_MALLOC_ENV = ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _run(retain: str) -> tuple[bool, int]:
    env = {key: value for key, value in os.environ.items() if key not in _MALLOC_ENV}
    proc = subprocess.run([sys.executable, "-c", _CHILD], env={**env, RETAIN_ENV: retain}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    tuned, faults = proc.stdout.split()
    return tuned == "True", int(faults)


def test_freed_blocks_are_reused_without_page_faults():
    tuned, faults = _run("1")
    assert tuned
    assert faults < PAGES // 100  # three blocks: 3 * PAGES faults if every block were fresh (4 KB pages)
    for off in ("0", "off"):
        untuned, faults_default = _run(off)
        assert not untuned
        # Each block was unmapped on free and faulted in again: 3 * PAGES faults with 4 KB pages,
        # ~100 where transparent huge pages are always on.
        assert faults_default > 50 and faults_default > 10 * faults
