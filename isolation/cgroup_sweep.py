"""The sweep of job cgroups that a dead worker left behind (at a worker's start and
periodically): in every hierarchy sandmill makes job cgroups in."""

from __future__ import annotations

import time
from pathlib import Path

from . import devices_cgroup
from .cgroups import V1_CONTROLLERS, CgroupHost, CgroupUnavailable, _own_v2_cgroup, detect


def sweep_stale(recheck_s: float = 5.0, parent: str = "sandmill") -> list[Path]:
    """Remove job cgroups (``job-*``, ``warm-*`` under ``parent``) that a dead worker left:
    those with no process and no child cgroup at two looks ``recheck_s`` apart. A live
    job's cgroup is empty only for moments (before its first process joins; after the job
    ends, until its worker reads and removes it), and rmdir itself refuses a cgroup that
    holds a process. (No age test: cgroupfs gives a directory the time its inode was last
    instantiated, not its creation time.) Returns what it removed."""
    try:
        host = detect()
    except CgroupUnavailable:
        return []
    first = _idle_cgroups(host, parent)
    if not first:
        return []
    time.sleep(recheck_s)
    removed = []
    for d in sorted(first & _idle_cgroups(host, parent)):
        try:
            d.rmdir()
            removed.append(d)
        except OSError:
            pass  # busy again, or gone
    return removed


def _idle_cgroups(host: CgroupHost, parent: str) -> set[Path]:
    if host.version == 2:
        assert host.v2_root is not None
        parents = {host.v2_root / parent, _own_v2_cgroup() / parent}
    else:
        parents = {host.mounts[c] / parent for c in V1_CONTROLLERS if c in host.mounts}
        if (dev := devices_cgroup.v1_mount()) is not None:  # GPU jobs' devices dirs
            parents.add(dev / parent)
    found: set[Path] = set()
    for p in parents:
        try:
            kids = [d for d in p.iterdir() if d.is_dir() and d.name.startswith(("job-", "warm-"))]
        except OSError:
            continue
        for d in kids:
            try:
                idle = not (d / "cgroup.procs").read_text().split()
                leaf = not any(c.is_dir() for c in d.iterdir())
            except OSError:
                continue
            if idle and leaf:
                found.add(d)
    return found
