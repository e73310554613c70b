"""CPU time, peak memory and OOM count of a Docker job, read from the host's cgroupfs.

Why not the stats API: it samples slowly (docs/performance.md) and stops answering once
the container exited, so short jobs would report nothing. Why not the container's own
cgroup: runc deletes it the moment the task exits, before we can read it.

So, when dockerd runs here with the ``cgroupfs`` driver, each job gets its own
``cgroup_parent`` (``/sandmill-docker/<job>``). Docker creates the container's cgroup
below it; the kernel charges CPU and memory hierarchically, so the parent still holds the
totals (``cpuacct.usage``, ``memory.max_usage_in_bytes`` on v1; ``cpu.stat``,
``memory.peak`` on v2) after the container is gone. We read them, then rmdir the parent.

With the ``systemd`` driver a parent must be a slice that systemd garbage-collects, so
there we poll the container's own scope while it runs (best effort: a job shorter than
one poll reports 0). With a remote dockerd nothing is readable and everything reads 0.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .cgroups import kill_until_empty

ROOT = "/sys/fs/cgroup"
PARENT = "sandmill-docker"


def cgroup_version(root: str = ROOT) -> int:
    """2 on a unified hierarchy, 1 on legacy/hybrid (v1 controllers mounted)."""
    return 2 if os.path.exists(os.path.join(root, "cgroup.controllers")) else 1


@dataclass
class Usage:
    """Totals of one job; 0 where unknown."""

    cpu_ns: int = 0
    peak_bytes: int = 0
    oom_kills: int = 0

    def merge(self, other: "Usage") -> None:
        """Keep the largest reading of each counter (all of them only grow)."""
        self.cpu_ns = max(self.cpu_ns, other.cpu_ns)
        self.peak_bytes = max(self.peak_bytes, other.peak_bytes)
        self.oom_kills = max(self.oom_kills, other.oom_kills)


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _read_keyed(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                k, _, v = line.partition(" ")
                if k == key:
                    return int(v)
    except (OSError, ValueError):
        pass
    return 0


def read_usage(rel: str, root: str = ROOT) -> Usage:
    """Usage of cgroup ``rel`` (a path below the hierarchy root, e.g.
    ``sandmill-docker/<job>``); zeros for whatever is missing."""
    rel = rel.strip("/")
    if cgroup_version(root) == 2:
        d = os.path.join(root, rel)
        peak = _read_int(os.path.join(d, "memory.peak"))  # kernel >= 5.19
        if not peak:
            peak = _read_int(os.path.join(d, "memory.current"))  # polling fallback
        return Usage(
            cpu_ns=_read_keyed(os.path.join(d, "cpu.stat"), "usage_usec") * 1000,
            peak_bytes=peak,
            oom_kills=_read_keyed(os.path.join(d, "memory.events"), "oom_kill"),
        )
    mem = os.path.join(root, "memory", rel)
    oom = _read_keyed(os.path.join(mem, "memory.oom_control"), "oom_kill")
    return Usage(
        cpu_ns=_read_int(os.path.join(root, "cpuacct", rel, "cpuacct.usage")),
        peak_bytes=_read_int(os.path.join(mem, "memory.max_usage_in_bytes")),
        oom_kills=oom,
    )


def job_parent(job_id: str) -> str:
    """The cgroup_parent given to Docker for one job (cgroupfs driver)."""
    return f"/{PARENT}/{job_id}"


def _in_each_hierarchy(rel: str, root: str) -> list[str]:
    """The dir of cgroup ``rel`` in each hierarchy (v1 has one per controller, v2 one)."""
    rel = rel.strip("/")
    if cgroup_version(root) == 2:
        return [os.path.join(root, rel)]
    try:
        return [os.path.join(root, h, rel) for h in os.listdir(root)]
    except OSError:
        return []


def remove_parent(job_id: str, root: str = ROOT) -> None:
    """rmdir the job's parent cgroup in every hierarchy. Best effort: an rmdir that fails
    leaves an empty cgroup, nothing else."""
    for d in _in_each_hierarchy(job_parent(job_id), root):
        try:
            os.rmdir(d)
        except OSError:
            pass


def scope_path(container_id: str, root: str = ROOT) -> str | None:
    """Relative cgroup of a running container under the systemd driver, if found."""
    for rel in (f"system.slice/docker-{container_id}.scope",):
        if cgroup_version(root) == 2:
            if os.path.isdir(os.path.join(root, rel)):
                return rel
        elif os.path.isdir(os.path.join(root, "memory", rel)):
            return rel
    return None


def _tree_dirs(rel: str, root: str) -> list[str]:
    """Every cgroup dir of ``rel``'s subtree, in each hierarchy that has one."""
    out = []
    for base in _in_each_hierarchy(rel, root):
        for d, _subdirs, _files in os.walk(base):
            out.append(d)
    return out


def kill_all(rel: str, timeout: float = 2.0, root: str = ROOT) -> bool:
    """SIGKILL every process in cgroup ``rel`` and below, from here, without dockerd: a
    slow or hung API call must not keep a job (a fork bomb) running. Loops until no
    process is left (a fork bomb adds some while we kill) or ``timeout``; True once empty.
    The container then exits as if ``docker kill``ed (its init is gone)."""
    if cgroup_version(root) == 2:
        kill_file = os.path.join(root, rel.strip("/"), "cgroup.kill")
        try:
            with open(kill_file, "w") as f:
                f.write("1")
        except OSError:
            pass

    def pids() -> set[int]:
        found: set[int] = set()
        for d in _tree_dirs(rel, root):
            try:
                with open(os.path.join(d, "cgroup.procs")) as f:
                    found.update(int(x) for x in f.read().split())
            except (OSError, ValueError):
                pass
        return found

    return kill_until_empty(pids, timeout, pause_s=0.005)
