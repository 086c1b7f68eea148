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


PROC_ROOT = Path("/proc")
"""Where Linux mounts the process file system: ``self/cgroup`` names the cgroups this process is in."""


def own_cgroups(proc_root: str | os.PathLike | None = None) -> tuple[str | None, str | None]:
    """The cgroups of this process, as paths below the mount root, from ``PROC_ROOT/self/cgroup``: v2's (the
    line ``0::/path``) and v1's memory controller's (a line ``N:...memory...:/path``); None for each not there."""
    try:
        lines = (Path(PROC_ROOT if proc_root is None else proc_root) / "self" / "cgroup").read_text().splitlines()
    except OSError:  # not Linux, or /proc not mounted: the mount roots' limits only
        return None, None
    v2 = v1 = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            v2 = parts[2]
        elif "memory" in parts[1].split(","):
            v1 = parts[2]
    return v2, v1


def _up_to(top: Path, cgroup: str | None) -> list[Path]:
    """The folders of ``cgroup`` (a path below ``top``) and of each cgroup above it, up to ``top``."""
    parts = [p for p in (cgroup or "").split("/") if p]
    if any(p in (".", "..") for p in parts):  # no cgroup path the kernel writes; never a folder outside ``top``
        parts = []
    return [top.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_memory_limit(root: str | os.PathLike | None = None,
                        proc_root: str | os.PathLike | None = None) -> int | None:
    """The memory limit of this process's cgroup, in bytes: the smallest of v2's ``memory.max`` ("max": none) and
    v1's ``memory/memory.limit_in_bytes`` (a huge value: none) in its own cgroup (:func:`own_cgroups`, read under
    ``proc_root``, default :data:`PROC_ROOT`) and in each cgroup above it, up to the hierarchy mounted at ``root``
    (default :data:`CGROUP_ROOT`): a limit on a parent (a systemd slice, a pod) holds for its children too. A
    cgroup whose folder is not there (a container that mounts its own cgroup as the root) is skipped; None
    without a limit."""
    root = Path(CGROUP_ROOT if root is None else root)
    v2, v1 = own_cgroups(proc_root)
    files = [folder / "memory.max" for folder in _up_to(root, v2)]
    files += [folder / "memory.limit_in_bytes" for folder in _up_to(root / "memory", v1)]
    limits = []
    for path in files:
        try:
            text = path.read_text().strip()
        except OSError:  # absent (another cgroup version, or none) or unreadable: no limit said there
            continue
        if text.isdigit() and int(text) < _UNLIMITED:
            limits.append(int(text))
    return min(limits, default=None)


def memory_limit(cgroup_root: str | os.PathLike | None = None,
                 proc_root: str | os.PathLike | None = None) -> MemoryLimit | None:
    """The memory this process may use: physical memory, or its cgroup's limit (:func:`cgroup_memory_limit` of
    ``cgroup_root`` and ``proc_root``) where smaller; None where neither is known (an OS that says neither)."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        physical = None
    cgroup = cgroup_memory_limit(cgroup_root, proc_root)
    if cgroup is not None and (physical is None or cgroup < physical):
        return MemoryLimit(cgroup, "this container's")
    return None if physical is None else MemoryLimit(physical, "this machine's")
