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


def _proc(root, text: str):
    """A /proc as the kernel mounts it, with this process's cgroup lines in self/cgroup."""
    (root / "self").mkdir(parents=True)
    (root / "self" / "cgroup").write_text(text)
    return root


def _limit(folder, name: str, value: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(value + "\n")


def test_the_limit_of_the_process_own_cgroup_and_those_above_it_holds(tmp_path):
    """A systemd service or a pod runs in a cgroup below the mount root, and the limit is set there or on a parent
    (its slice): the root's file, read alone, said no limit. The smallest on the way from the process's own cgroup
    up to the root holds; a sibling's is not this process's."""
    root = tmp_path / "cgroup"
    _limit(root, "memory.max", "max")
    _limit(root / "user.slice", "memory.max", str(2 * GIB))
    _limit(root / "user.slice" / "app.scope", "memory.max", "max")
    _limit(root / "user.slice" / "other.scope", "memory.max", str(GIB // 4))  # a sibling's
    proc = _proc(tmp_path / "proc", "0::/user.slice/app.scope\n")
    assert cgroup_memory_limit(root, proc) == 2 * GIB  # the parent's
    _limit(root / "user.slice" / "app.scope", "memory.max", str(GIB))
    assert cgroup_memory_limit(root, proc) == GIB  # its own, the smaller
    assert memory_limit(root, proc) == MemoryLimit(GIB, "this container's")


@pytest.mark.parametrize("line", ["4:memory:/docker/abc", "5:cpuacct,memory:/docker/abc"], ids=["alone", "joined"])
def test_a_v1_memory_cgroup_is_followed_from_its_line(tmp_path, line):
    """v1 names the memory controller's cgroup on its own line (alone or with other controllers); its limit lies
    under the memory controller's mount."""
    root = tmp_path / "cgroup"
    _limit(root / "memory", "memory.limit_in_bytes", "9223372036854771712")
    _limit(root / "memory" / "docker" / "abc", "memory.limit_in_bytes", str(GIB))
    _limit(root / "memory" / "docker", "memory.limit_in_bytes", str(3 * GIB))
    proc = _proc(tmp_path / "proc", f"9:name=systemd:/\n{line}\n3:cpuset:/\n0::/\n")
    assert cgroup_memory_limit(root, proc) == GIB


def test_a_cgroup_mounted_as_the_root_or_no_proc_reads_the_root(tmp_path):
    """A container with its own cgroup namespace mounts its cgroup as the root, while self/cgroup may still name
    the host's path (no such folder here): the root's limit holds, as it does without /proc."""
    root = _cgroup(tmp_path / "cgroup", v2=str(GIB), v1=str(2 * GIB))
    proc = _proc(tmp_path / "proc", "0::/docker/abc\n4:memory:/docker/abc\n")
    assert cgroup_memory_limit(root, proc) == GIB
    assert cgroup_memory_limit(root, tmp_path / "no-proc") == GIB
    assert cgroup_memory_limit(tmp_path / "none", proc) is None
