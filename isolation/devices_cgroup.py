"""The device cgroup of a GPU job: it may open exactly the device nodes its sandbox gives it.

A GPU job's nodes are bound into its sandbox (nsjail ``-B``, the process backend's private
/dev), and the job has no ``CAP_MKNOD``; the device cgroup adds the kernel's own check on
every ``open()`` of a device node by major:minor, whatever path reaches it: a node of
another GPU that some mount, a bug or a later change leaves reachable fails with EPERM.

cgroup v1 with a ``devices`` hierarchy: the job gets a ``devices`` dir beside its memory/
pids ones (``JobCgroup.create(..., devices=rules)``), set to ``devices.deny a`` then one
``devices.allow`` per node the backend exposes (its standard nodes and the grant's GPU and
control nodes, by their real ``st_rdev``). cgroup v2 has no such files: the device
controller there is a BPF program attached to the cgroup (``BPF_CGROUP_DEVICE``), which
sandmill does not load; ``gap()`` says so and the backends declare it in their probe
(``gpu_device_cgroup``). Jobs without a GPU get no device cgroup: nothing changes for them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

GAP_KEY = "gpu_device_cgroup"  # the key in a backend's Probe.gaps


def v1_mount() -> Path | None:
    """The mount point of the cgroup v1 ``devices`` hierarchy, or None."""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4 and parts[2] == "cgroup" and "devices" in parts[3].split(","):
                    return Path(parts[1])
    except OSError:
        pass
    return None


def gap() -> str | None:
    """None when GPU jobs get a device cgroup on this host, else why not, in words. (v2
    as cgroups.detect() tells it: /sys/fs/cgroup is the unified hierarchy.)"""
    if Path("/sys/fs/cgroup/cgroup.controllers").exists():
        return ("cgroup v2: the device controller is a BPF program (not loaded by sandmill); "
                "GPU jobs rely on their sandbox holding only their own nodes and on having no CAP_MKNOD")
    mount = v1_mount()
    if mount is None:
        return "no cgroup v1 devices hierarchy mounted"
    if not os.access(mount, os.W_OK):
        return f"cgroup v1 devices hierarchy {mount} is not writable"
    return None


def rules(paths: Iterable[str]) -> list[str]:
    """One ``devices.allow`` line (``c MAJOR:MINOR rwm``) per device node in ``paths``, by
    its real major:minor (stand-in nodes give theirs), each once. Paths that are missing
    or not device nodes are skipped: what the backend cannot bind is refused before this."""
    out: list[str] = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            continue
        kind = "c" if stat.S_ISCHR(st.st_mode) else "b" if stat.S_ISBLK(st.st_mode) else None
        if kind is None:
            continue
        line = f"{kind} {os.major(st.st_rdev)}:{os.minor(st.st_rdev)} rwm"
        if line not in out:
            out.append(line)
    return out


def make(parent: str, name: str) -> Path:
    """Create (or find, where devices is co-mounted with memory/pids) the job's dir
    ``<mount>/<parent>/<name>`` of the devices hierarchy; ``restrict`` sets it. Raises
    OSError (FileNotFoundError when there is no devices hierarchy)."""
    mount = v1_mount()
    if mount is None:
        raise FileNotFoundError("no cgroup v1 devices hierarchy mounted")
    base = mount / parent
    base.mkdir(exist_ok=True)
    d = base / name
    d.mkdir(exist_ok=True)  # the name is fresh; exists only when co-mounted
    return d


def restrict(d: Path, allow: list[str]) -> None:
    """Deny every device in ``d``, then allow each line of ``allow`` (the kernel keeps the
    exceptions; a job dir has no child cgroup, which ``deny a`` requires)."""
    _write(d / "devices.deny", "a")
    for line in allow:
        _write(d / "devices.allow", line)


def allowed(d: Path) -> list[str]:
    """The allow list the kernel holds for ``d`` (``devices.list``)."""
    return (d / "devices.list").read_text().split("\n")[:-1]


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)
