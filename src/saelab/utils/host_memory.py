"""Keep freed host memory in the process, so that the next training step reuses it.

A training step on the CPU frees and allocates again, every step, several tensors of tens to
hundreds of MB: the encoder's [2,048, n] chunk buffer, the [n, d] gradients, the decoder
projection's temporary. glibc's malloc
serves every block above 32 MB with a fresh mmap and unmaps it on free, so the kernel faults in and
zeroes every page again each time. Told to serve large blocks from its heap (those allocated by the
main thread, where torch allocates an operator's output; other threads' arenas above 64 MB still
map and unmap) and to keep up to 2 GiB of freed memory at the heap's top, malloc hands the next
step the same pages. Measured on a 2-core EPYC VM (benchmarks/host_memory.py, benchmarks/RESULTS.md
"Host memory reuse"): a step at n = 32,768 goes from ~90,000 page faults and ~300 ms of kernel time
to none, 0.91x the wall time; at n = 8,192, whose blocks glibc mostly reuses already, no change
(0.93-1.15x per pair, median 1.01).

The cost: memory the process frees goes back to the OS only from the heap's top, past 2 GiB free
there; a large block freed below a live small one stays resident. Where the sizes of the large
blocks keep changing and small results stay alive between them (an evaluation: a logits block per
ablation site, its size set by the site, beside the scores it keeps), the freed blocks rarely fit
the next request and the heap keeps growing: the paper suite's ablation-sparsity stage on a
small local model went from 1.9 GB to 20 GB in two minutes, against 0.9 GB with malloc as it is.
So only a training run holds the setting (``TrainingRun``, on the CPU), whose steps allocate the
same sizes every time; the last run to close puts glibc's default trim threshold and mmap count
back and hands the freed memory to the OS (malloc_trim). (glibc's threshold for serving a block by
mmap, which it raises by itself up to 32 MB as blocks are freed, then stays where it was: any
mallopt call ends that adjustment.) On a GPU the per-step blocks live in CUDA's own caching
allocator. ``SAELAB_RETAIN_FREED_MEMORY=0`` (or false, no, off) leaves malloc as it is, and so do
glibc's own settings in the environment (GLIBC_TUNABLES, MALLOC_*_), which this would override.
Other C libraries (musl, macOS), and a malloc preloaded in glibc's place, are left as they are:
this is glibc's interface.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from collections.abc import Iterator

RETAIN_ENV = "SAELAB_RETAIN_FREED_MEMORY"
"""Set to 0 (false, no, off) to leave glibc's malloc settings alone."""
_OFF = {"0", "false", "no", "off"}

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_MAX = -4
_TRIM_BYTES = 2**31 - 1  # mallopt takes an int: the largest is 2 GiB
_DEFAULT_TRIM_BYTES = 128 * 1024  # glibc's defaults (malloc.c: DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX)
_DEFAULT_MMAP_MAX = 65536

_lock = threading.Lock()
_holders = 0  # open holds (training runs); the setting is on while there is one
_tuned = False


def _wanted() -> bool:
    own_settings = "GLIBC_TUNABLES" in os.environ or any(
        key.startswith("MALLOC_") and key.endswith("_") for key in os.environ)
    return (os.environ.get(RETAIN_ENV, "1").strip().lower() not in _OFF and not own_settings
            and platform.libc_ver()[0] == "glibc")


def _set_malloc(trim_bytes: int, mmap_max: int) -> bool:
    """Trim threshold first: mmap stays as it was if that fails. Without mmap, large blocks come from
    the heap (brk; glibc falls back to mmap if brk fails)."""
    try:  # a speed setting: never an error (e.g. a static Python without mallopt)
        mallopt = ctypes.CDLL(None).mallopt
        return bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes)) and bool(mallopt(_M_MMAP_MAX, mmap_max))
    except (OSError, AttributeError):
        return False


def hold_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse until the matching :func:`release_freed_memory`
    (holds nest; see the module docstring). Returns whether malloc is so tuned: False off glibc,
    without mallopt, or with the opt-out."""
    global _holders, _tuned
    with _lock:
        _holders += 1
        if _holders == 1 and _wanted():
            _tuned = _set_malloc(_TRIM_BYTES, 0)
            if not _tuned:  # the trim threshold may have been set before mmap failed
                _set_malloc(_DEFAULT_TRIM_BYTES, _DEFAULT_MMAP_MAX)
        return _tuned


def release_freed_memory() -> None:
    """End one hold; the last one puts glibc's defaults back and returns the freed memory to the OS."""
    global _holders, _tuned
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0 and _tuned:
            _tuned = False
            _set_malloc(_DEFAULT_TRIM_BYTES, _DEFAULT_MMAP_MAX)
            with contextlib.suppress(OSError, AttributeError):
                ctypes.CDLL(None).malloc_trim(0)


@contextlib.contextmanager
def freed_memory_retained() -> Iterator[bool]:
    """``hold_freed_memory`` for the ``with`` block; yields whether malloc is so tuned."""
    try:
        yield hold_freed_memory()
    finally:
        release_freed_memory()
