"""How much memory this process may use: the machine's physical memory, or its container's limit where smaller.

A container (Docker, Kubernetes, a systemd slice) caps its processes' memory with a cgroup; a process past
the cap is killed by the kernel's OOM killer, with no Python error to report, while the machine's physical
memory (``os.sysconf``) still reads as the whole host's. A size check that compares with memory compares with
this, the smaller of the two.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

CGROUP_ROOT = Path("/sys/fs/cgroup")
"""Where Linux mounts the cgroup hierarchy (inside a container: the container's own)."""

_UNLIMITED = 2**62
"""cgroup v1 says "no limit" with the largest page count it can hold in bytes (9223372036854771712 on 4 KiB
pages): a limit at least this large limits nothing."""


class MemoryLimit(NamedTuple):
    size: int
    """Bytes."""
    whose: str
    """Whose limit it is, as a refusal says it: "this machine's" or "this container's"."""


def cgroup_memory_limit(root: str | os.PathLike | None = None) -> int | None:
    """The memory limit of the cgroup mounted at ``root`` (default :data:`CGROUP_ROOT`), in bytes: v2's
    ``memory.max`` ("max": none) or v1's ``memory/memory.limit_in_bytes`` (a huge value: none), the smaller where
    both are there; None without one."""
    root = Path(CGROUP_ROOT if root is None else root)
    limits = []
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        try:
            text = path.read_text().strip()
        except OSError:  # absent (another cgroup version, or none) or unreadable: no limit said there
            continue
        if text.isdigit() and int(text) < _UNLIMITED:
            limits.append(int(text))
    return min(limits, default=None)


def memory_limit(cgroup_root: str | os.PathLike | None = None) -> MemoryLimit | None:
    """The memory this process may use: physical memory, or the cgroup's limit at ``cgroup_root`` where smaller;
    None where neither is known (an OS that says neither)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        physical = None
    cgroup = cgroup_memory_limit(cgroup_root)
    if cgroup is not None and (physical is None or cgroup < physical):
        return MemoryLimit(cgroup, "this container's")
    return None if physical is None else MemoryLimit(physical, "this machine's")
