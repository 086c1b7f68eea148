"""Keep freed host memory in the process, so that the next training step reuses it.

A training step on the CPU frees and allocates again, every step, several tensors of tens to
hundreds of MB: the encoder's [2,048, n] chunk buffer, the [n, d] gradients, the decoder
projection's temporary; a language model's forward does the same with its logits. glibc's malloc
serves every block above 32 MB with a fresh mmap and unmaps it on free, so the kernel faults in and
zeroes every page again each time. Told to serve large blocks from its heap (those allocated by the
main thread, where torch allocates an operator's output; other threads' arenas above 64 MB still
map and unmap) and to keep up to 2 GiB of freed memory at the heap's top, malloc hands the next
step the same pages. Measured on a 2-core EPYC VM (benchmarks/host_memory.py, benchmarks/RESULTS.md
"Host memory reuse"): a step at n = 32,768 goes from ~90,000 page faults and ~300 ms of kernel time
to none, 0.91x the wall time; a cross-entropy forward of SmolLM2 on [16, 128] tokens 0.91x; at
n = 8,192, whose blocks glibc mostly reuses already, no change (0.93-1.15x per pair, median 1.01).

The cost: memory the process frees goes back to the OS only from the heap's top, past 2 GiB free
there; a large block freed below a live small one stays resident until the process ends. So only
CPU work asks for it (the CPU trainer, and CLI verbs run on the CPU): on a GPU the per-step blocks
live in CUDA's own caching allocator, and the freed CPU copy of a model moved to the GPU would stay
resident. The setting is for the whole process and stays; ``SAELAB_RETAIN_FREED_MEMORY=0`` (or
false, no, off) leaves malloc as it is. Other C libraries (musl, macOS), and a malloc preloaded in
glibc's place, are left as they are: this is glibc's interface.
"""

from __future__ import annotations

import ctypes
import os
import platform

RETAIN_ENV = "SAELAB_RETAIN_FREED_MEMORY"
"""Set to 0 (false, no, off) to leave glibc's malloc settings alone."""
_OFF = {"0", "false", "no", "off"}

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_TRIM_BYTES = 2**31 - 1  # mallopt takes an int: the largest is 2 GiB

_tuned: bool | None = None


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (once per process; see the module docstring).
    Returns whether malloc is so tuned: False off glibc, without mallopt, or with the opt-out."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if os.environ.get(RETAIN_ENV, "1").strip().lower() not in _OFF and platform.libc_ver()[0] == "glibc":
            try:  # a speed setting: never an error (e.g. a static Python without mallopt)
                mallopt = ctypes.CDLL(None).mallopt
                # Trim threshold first: mmap stays on if it fails. Without mmap, large blocks come from
                # the heap (brk; glibc falls back to mmap if brk fails).
                _tuned = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_BYTES)) and bool(mallopt(_M_MMAP_MAX, 0))
            except (OSError, AttributeError):
                pass
    return _tuned
