"""Finding this process's cgroup v2 from /proc's text: no files, no cgroups."""

from __future__ import annotations

from pathlib import Path

from rotator.cgroups import own_cgroup

UNIFIED = (
    "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n"
)
HYBRID = (
    "33 25 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755\n"
    "34 33 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n"
    "35 33 0:30 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"
)


def test_unified_hierarchy() -> None:
    cgroup = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/rotator.service\n"
    assert own_cgroup(cgroup, UNIFIED) == Path(
        "/sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/app.slice/rotator.service"
    )


def test_hybrid_hierarchy_uses_the_v2_mount() -> None:
    cgroup = "4:memory:/x\n1:name=systemd:/\n0::/\n"
    assert own_cgroup(cgroup, HYBRID) == Path("/sys/fs/cgroup/unified")


def test_cgroup_v1_only_or_no_v2_mount_is_none() -> None:
    assert own_cgroup("4:memory:/x\n1:name=systemd:/\n", HYBRID) is None
    assert own_cgroup("0::/\n", HYBRID.splitlines()[0] + "\n") is None


def test_a_v2_mount_of_a_subtree_is_not_taken_for_the_root() -> None:
    # A container's bind mount of some cgroup: paths in /proc/self/cgroup are not below it.
    mount = "40 30 0:30 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert own_cgroup("0::/docker/abc\n", mount) is None
