"""The memory this process may use: physical memory, or a container's cgroup limit where smaller, read from real
cgroup files written under a folder standing for /sys/fs/cgroup (v2's memory.max, v1's memory.limit_in_bytes)."""

from __future__ import annotations

import os

import pytest

from saelab.utils.memory_limit import MemoryLimit, cgroup_memory_limit, memory_limit

GIB = 2**30
PHYSICAL = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _cgroup(root, v2: str | None = None, v1: str | None = None):
    """A cgroup folder as the kernel mounts it: v2's limit in memory.max, v1's in memory/memory.limit_in_bytes."""
    root.mkdir(exist_ok=True)
    if v2 is not None:
        (root / "memory.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "memory").mkdir()
        (root / "memory" / "memory.limit_in_bytes").write_text(v1 + "\n")
    return root


@pytest.mark.parametrize("v2,v1,limit", [
    (str(GIB), None, GIB),  # v2, limited
    ("max", None, None),  # v2, no limit
    (None, str(2 * GIB), 2 * GIB),  # v1, limited
    (None, "9223372036854771712", None),  # v1's "no limit": the largest page count in bytes
    (None, None, None),  # no cgroup files: no container
    (str(3 * GIB), str(GIB), GIB),  # both mounted: the smaller holds
], ids=["v2", "v2-max", "v1", "v1-unlimited", "none", "both"])
def test_the_cgroup_limit_is_read_from_either_version(tmp_path, v2, v1, limit):
    assert cgroup_memory_limit(_cgroup(tmp_path / "cgroup", v2, v1)) == limit


def test_the_smaller_of_physical_memory_and_the_container_limit_is_used(tmp_path):
    """A check that compared with physical memory alone let a container's process past its limit, where the
    kernel kills it without a word: the limit is used where it is smaller, and said to be the container's."""
    assert memory_limit(_cgroup(tmp_path / "small", v2=str(GIB))) == MemoryLimit(GIB, "this container's")
    assert memory_limit(_cgroup(tmp_path / "v1", v1=str(GIB))) == MemoryLimit(GIB, "this container's")
    for unlimited in (_cgroup(tmp_path / "max", v2="max"), _cgroup(tmp_path / "large", v2=str(2 * PHYSICAL)),
                      tmp_path / "absent"):
        assert memory_limit(unlimited) == MemoryLimit(PHYSICAL, "this machine's")
