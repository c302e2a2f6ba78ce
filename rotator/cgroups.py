"""A cgroup per instance, on Linux where rotator may make one: what a tree scan misses.

A process that leaves its instance's process group, outlives its parent and clears
its environment (so drops the ROTATOR_INSTANCE marker) is found by nothing that
instance.py scans. A cgroup (v2) holds every process forked inside it, whatever it
does, so an instance's cgroup names all of its processes, and `cgroup.kill` (Linux
5.14+) kills them in one step, as systemd stops a unit.

rotator makes each instance's cgroup under its own (`rotator-<marker>`), which it may
do when it runs as root or in a cgroup delegated to it (systemd `Delegate=yes`);
`parent()` tells once, at start-up, and everywhere else (macOS, a read-only cgroupfs,
cgroup v1 only) the answer is None and instances simply have no cgroup. The spawner
moves each child into its cgroup before exec (spawner_process.py); this module makes,
reads, kills and removes them. `own_cgroup` is the pure part: reading /proc/self/cgroup
and /proc/self/mountinfo.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

PREFIX = "rotator-"


def own_cgroup(cgroup: str, mountinfo: str) -> Path | None:
    """The directory of this process's cgroup v2, from the text of /proc/self/cgroup and
    /proc/self/mountinfo; None without a cgroup v2 mount (cgroup v1 only)."""
    path = next((line[3:] for line in cgroup.splitlines() if line.startswith("0::")), None)
    if path is None:
        return None
    for line in mountinfo.splitlines():
        # "id parent major:minor root mountpoint options [optional...] - fstype source ..."
        left, _, right = line.partition(" - ")
        fields = left.split()
        if right.split()[:1] == ["cgroup2"] and len(fields) >= 5 and fields[3] == "/":
            return Path(fields[4].replace("\\040", " ")) / path.lstrip("/")
    return None


def parent() -> Path | None:
    """Where this process may make a cgroup per instance (its own cgroup), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        here = own_cgroup(
            Path("/proc/self/cgroup").read_text(), Path("/proc/self/mountinfo").read_text()
        )
    except OSError:
        return None
    if here is None or not os.access(here / "cgroup.procs", os.W_OK):
        return None
    probe = here / f"{PREFIX}probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError:  # read-only, or not ours
        return None
    return here


def name_of(marker: str) -> str:
    """The name of the cgroup of the instance `marker` (a glob pattern stays one)."""
    return PREFIX + marker.replace(":", "-").replace("/", "-")


def make(parent: Path, marker: str) -> Path | None:
    """A new cgroup for the instance `marker`, or None if it cannot be made."""
    path = parent / name_of(marker)
    try:
        path.mkdir()
    except OSError:
        return None
    return path


def of_process(pid: int) -> Path | None:
    """The cgroup rotator made for the instance `pid` runs in, if any (Linux)."""
    try:
        here = own_cgroup(
            Path(f"/proc/{pid}/cgroup").read_text(), Path("/proc/self/mountinfo").read_text()
        )
    except OSError:
        return None
    return here if here is not None and here.name.startswith(PREFIX) else None


def members(cgroup: Path) -> list[int]:
    """The pids in `cgroup` now; none when it is gone."""
    try:
        return [int(pid) for pid in (cgroup / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def kill(cgroup: Path) -> bool:
    """SIGKILL to everything in `cgroup` at once (cgroup.kill, Linux 5.14+), also what
    forks meanwhile; False where the kernel has no cgroup.kill."""
    try:
        (cgroup / "cgroup.kill").write_text("1")
    except OSError:
        return False
    return True


def remove(cgroup: Path) -> None:
    """Remove `cgroup` once empty (the kernel refuses while a process is in it)."""
    with contextlib.suppress(OSError):
        cgroup.rmdir()
