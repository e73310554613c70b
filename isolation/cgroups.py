"""Per-job cgroups on cgroup v1 (memory, pids, cpuacct hierarchies) and v2 (unified).

A job cgroup lives under a ``sandmill`` parent in each hierarchy (v1: memory, pids,
cpuacct and, where mounted, cpu for the quota of ``Limits.cpu_cores``). The caller puts the
job's first process in it *before* exec (see ``JobCgroup.procs_files``), so every
descendant is counted for memory and pids and can be swept when the job ends.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from . import devices_cgroup
from .cgroupfs import kill_until_empty, read_text as _read_text, write as _write  # noqa: F401 - re-exported

CGROUP_ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpuacct", "cpu")
CPU_PERIOD_US = 100_000  # the CFS period of a job's CPU quota (the kernel's default)


class CgroupUnavailable(RuntimeError):
    """No usable cgroup hierarchy here (not root, read-only mount, missing controller)."""


@dataclass(frozen=True)
class CgroupHost:
    """What this host offers: ``version`` 1 or 2, the mount of each controller."""

    version: int
    mounts: dict[str, Path] = field(default_factory=dict)  # v1: controller -> mount
    v2_root: Path | None = None


def _v1_mounts() -> dict[str, Path]:
    """Controller -> mount point of each cgroup v1 hierarchy, from /proc/self/mounts."""
    found: dict[str, Path] = {}
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 4 or parts[2] != "cgroup":
                continue
            for opt in parts[3].split(","):
                if opt in V1_CONTROLLERS and opt not in found:
                    found[opt] = Path(parts[1])
    return found


@lru_cache(maxsize=1)
def detect() -> CgroupHost:
    """Find the cgroup layout: pure v2 when /sys/fs/cgroup is cgroup2 (with memory),
    else v1 when memory and pids hierarchies are mounted. Raises CgroupUnavailable."""
    if os.geteuid() != 0:
        raise CgroupUnavailable("not root: cannot create job cgroups")
    ctl = CGROUP_ROOT / "cgroup.controllers"
    if ctl.exists():
        have = ctl.read_text().split()
        if "memory" in have and "pids" in have:
            return CgroupHost(version=2, v2_root=CGROUP_ROOT)
        raise CgroupUnavailable(f"cgroup v2 without memory/pids controllers (have {have})")
    mounts = _v1_mounts()
    if "memory" in mounts and "pids" in mounts:
        return CgroupHost(version=1, mounts=mounts)
    raise CgroupUnavailable(f"no cgroup v2 and no v1 memory+pids hierarchies (found {sorted(mounts)})")


def probe_gap() -> str | None:
    """None when job cgroups work here, else the reason in words."""
    try:
        host = detect()
        _ensure_parent(host, "sandmill")
    except (CgroupUnavailable, OSError) as e:
        return f"cgroups unavailable: {e}"
    return None


def cpu_quota_gap() -> str | None:
    """None when job cgroups can bound a job's CPU rate (``Limits.cpu_cores``) here,
    else the reason in words (v1 without a cpu hierarchy, v2 without the cpu controller)."""
    gap = probe_gap()
    if gap is not None:
        return gap
    host = detect()
    if host.version == 1:
        return None if "cpu" in host.mounts else "no cgroup v1 cpu hierarchy mounted"
    parents = _ensure_parent(host, "sandmill")
    have = (parents[0][1] / "cgroup.subtree_control").read_text().split()
    return None if "cpu" in have else "cgroup v2 cpu controller not enabled for job cgroups"


# a recycled job cgroup may hold this much of its last job's page cache (JobCgroup.recycle)
RECYCLE_MAX_LEFT_BYTES = 2 << 20



def _v2_enable(dir_: Path, controllers: list[str]) -> None:
    """Enable controllers for dir_'s children. Fails with EBUSY when dir_ (not the root)
    holds processes itself: then move them into a ``worker`` leaf first, as v2 demands."""
    want = " ".join(f"+{c}" for c in controllers)
    try:
        _write(dir_ / "cgroup.subtree_control", want)
    except OSError as e:
        if e.errno != errno.EBUSY:
            raise
        leaf = dir_ / "worker"
        leaf.mkdir(exist_ok=True)
        for pid in (dir_ / "cgroup.procs").read_text().split():
            try:
                _write(leaf / "cgroup.procs", pid)
            except OSError:
                pass  # exited meanwhile, or a kernel thread
        _write(dir_ / "cgroup.subtree_control", want)


def _own_v2_cgroup() -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROUP_ROOT / line[3:].lstrip("/")
    return CGROUP_ROOT


_PARENTS: dict[str, tuple[tuple[str, Path], ...]] = {}


def _ensure_parent(host: CgroupHost, name: str) -> tuple[tuple[str, Path], ...]:
    """Create the sandmill parent cgroup(s) once per process; return (key, path) pairs."""
    if name not in _PARENTS or not all(p.is_dir() for _, p in _PARENTS[name]):
        _PARENTS[name] = _make_parent(host, name)
    return _PARENTS[name]


def _make_parent(host: CgroupHost, name: str) -> tuple[tuple[str, Path], ...]:
    if host.version == 2:
        assert host.v2_root is not None
        have = (host.v2_root / "cgroup.controllers").read_text().split()
        ctrls = [c for c in ("memory", "pids", "cpu") if c in have]
        # Prefer a parent at the root (no internal-process rule there); inside a
        # delegated subtree (container, systemd unit) nest under our own cgroup.
        for base in (host.v2_root, _own_v2_cgroup()):
            try:
                _v2_enable(base, ctrls)
                parent = base / name
                parent.mkdir(exist_ok=True)
                _v2_enable(parent, ctrls)
                return (("unified", parent),)
            except OSError:
                continue
        raise CgroupUnavailable("cannot create a v2 parent with memory+pids enabled")
    pairs: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for ctrl in V1_CONTROLLERS:
        mount = host.mounts.get(ctrl)
        if mount is None or mount in seen:  # e.g. "cpu,cpuacct" co-mounted with memory
            continue
        seen.add(mount)
        p = mount / name
        p.mkdir(exist_ok=True)
        pairs.append((ctrl, p))
    return tuple(pairs)


class JobCgroup:
    """One job's cgroup (one directory per v1 hierarchy, or one on v2)."""

    def __init__(self, host: CgroupHost, dirs: dict[str, Path]) -> None:
        self.host = host
        self.dirs = dirs  # "memory"/"pids"/"cpuacct" -> dir on v1; "unified" -> dir on v2
        self._limits: tuple[int | None, int | None, float | None] | None = None  # the last set
        self._recycled = False  # it ran a job before (recycle): its limits are that job's
        self._oom_base = 0  # OOM kills of the jobs before (v1's count cannot be reset)

    @classmethod
    def create(cls, memory_bytes: int | None, pids: int | None, parent: str = "sandmill",
               prefix: str = "job", cpu_cores: float | None = None,
               devices: list[str] | None = None) -> "JobCgroup":
        """Make a fresh job cgroup with the given limits; ``devices`` (v1 only): the
        ``devices.allow`` lines of a GPU job, all else denied (devices_cgroup.py).
        Raises CgroupUnavailable/OSError."""
        host = detect()
        parents = _ensure_parent(host, parent)
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        dirs: dict[str, Path] = {}
        cg = cls(host, dirs)
        try:
            for key, p in parents:
                d = p / name
                d.mkdir()
                dirs[key] = d
        except BaseException:
            cg.remove()
            raise
        if host.version == 1:  # co-mounted controllers share one dir: alias it by name
            for ctrl in V1_CONTROLLERS:
                for key, d in list(dirs.items()):
                    if ctrl not in dirs and host.mounts.get(ctrl) == host.mounts.get(key):
                        dirs[ctrl] = d
        try:
            cg._limit(memory_bytes, pids, cpu_cores)
            if devices is not None:
                if host.version != 1:
                    raise CgroupUnavailable(devices_cgroup.gap() or "not cgroup v1")
                dirs.setdefault("devices", devices_cgroup.make(parent, name))  # removed with the rest
                devices_cgroup.restrict(dirs["devices"], devices)
        except BaseException:
            cg.remove()
            raise
        return cg

    def set_limits(self, memory_bytes: int | None, pids: int | None,
                   cpu_cores: float | None = None) -> None:
        """Set (or change) the memory, pids and CPU-rate limits; None leaves one as it is
        (in a recycled cgroup: none, the last job's limits do not carry over)."""
        want = (memory_bytes, pids, cpu_cores)
        if self._recycled:
            if want == self._limits:
                return  # the same as the last job's: the usual case, no write
            self._unlimit()
        self._limit(memory_bytes, pids, cpu_cores)
        self._limits = want

    def _unlimit(self) -> None:
        """(v1, a recycled cgroup) No memory, pids or CPU-rate limit (memsw before memory:
        the kernel keeps memsw >= memory)."""
        m, p, c = self.dirs.get("memory"), self.dirs.get("pids"), self.dirs.get("cpu")
        if m is not None:
            if (m / "memory.memsw.limit_in_bytes").exists():
                _write(m / "memory.memsw.limit_in_bytes", "-1")
            _write(m / "memory.limit_in_bytes", "-1")
        if p is not None:
            _write(p / "pids.max", "max")
        if c is not None and (c / "cpu.cfs_quota_us").exists():
            _write(c / "cpu.cfs_quota_us", "-1")
        self._recycled, self._limits = False, None

    def recycle(self, emptied: bool = False) -> bool:
        """Make this cgroup, whose job has ended, ready for another job (cgroup v1): only
        when no process is left in it; its counters start again (peak memory and CPU
        reset, OOM kills counted from here).
        At most RECYCLE_MAX_LEFT_BYTES may be left charged (the next job's peak memory
        counts it). Cheaper than a new cgroup and the old one's removal (~0.3 ms against ~0.9 ms of
        kernel time per job; docs/performance.md). False when it cannot be (cgroup v2,
        whose memory.peak is not reset for every reader; a process left; a write that
        failed): then remove it. ``emptied``: kill_all() just found it empty."""
        if self.host.version != 1 or (not emptied and self.pids()):
            return False
        try:
            m = self.dirs.get("memory")
            if m is not None:
                # what the last job left charged (page cache of files it read first): a
                # little is kept (force_empty would evict it from the page cache, 0.5-1 ms
                # a job, and the next job would read it again), more and it is not reused
                left = int(_read_text(m / "memory.usage_in_bytes"))
                if left > RECYCLE_MAX_LEFT_BYTES:
                    return False
                _write(m / "memory.max_usage_in_bytes", "0")
            c = self.dirs.get("cpuacct")
            if c is not None:
                _write(c / "cpuacct.usage", "0")
            self._oom_base = self._oom_total()
        except OSError:
            return False
        self._recycled = True
        return True

    def add(self, pid: int) -> None:
        """Move process ``pid`` (not its existing children) into this cgroup."""
        for procs in self.procs_files():
            _write(Path(procs), str(pid))

    def _limit(self, memory_bytes: int | None, pids: int | None, cpu_cores: float | None = None) -> None:
        if cpu_cores is not None:
            self._cpu_quota(cpu_cores)
        if self.host.version == 2:
            d = self.dirs["unified"]
            if memory_bytes is not None:
                _write(d / "memory.max", str(memory_bytes))
                if (d / "memory.swap.max").exists():
                    _write(d / "memory.swap.max", "0")  # memory+swap == memory
            if pids is not None:
                _write(d / "pids.max", str(pids))
            return
        if memory_bytes is not None:
            m = self.dirs["memory"]
            _write(m / "memory.limit_in_bytes", str(memory_bytes))
            sw = m / "memory.memsw.limit_in_bytes"
            if sw.exists():  # absent when the kernel runs without swap accounting
                _write(sw, str(memory_bytes))
        if pids is not None:
            _write(self.dirs["pids"] / "pids.max", str(pids))

    def _cpu_quota(self, cores: float) -> None:
        """CFS bandwidth: at most ``cores`` CPUs' worth of time per period, all the job's
        processes together (v2 ``cpu.max``; v1 ``cpu.cfs_quota_us``). No-op where the cpu
        controller is missing: the backend's probe declares that gap."""
        quota = max(1000, int(cores * CPU_PERIOD_US))  # the kernel's minimum is 1 ms
        if self.host.version == 2:
            f = self.dirs["unified"] / "cpu.max"
            if f.exists():
                _write(f, f"{quota} {CPU_PERIOD_US}")
            return
        d = self.dirs.get("cpu")
        if d is not None:
            _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(d / "cpu.cfs_quota_us", str(quota))

    def procs_files(self) -> list[str]:
        """cgroup.procs paths: a pid written there moves that process, every thread
        (``add``)."""
        return [str(d / "cgroup.procs") for d in self.unique_dirs()]

    def move_files(self) -> list[str]:
        """Where a single-threaded process writes "0" to move itself here (a cold job's
        child before its exec, a zygote): v1 ``tasks`` (a thread that moves itself takes
        no global lock), v2 ``cgroup.procs``."""
        name = "tasks" if self.host.version == 1 else "cgroup.procs"
        return [str(d / name) for d in self.unique_dirs()]

    def unique_dirs(self) -> list[Path]:
        """Each job dir once (v1 co-mounted controllers share one)."""
        return list(dict.fromkeys(self.dirs.values()))

    def _read(self, key: str, fname: str) -> str | None:
        d = self.dirs.get(key)
        if d is None:
            return None
        try:
            return _read_text(d / fname)
        except OSError:
            return None

    def peak_memory_bytes(self) -> int:
        """Highest memory use seen (0 when the kernel does not record it)."""
        if self.host.version == 2:
            v = self._read("unified", "memory.peak") or self._read("unified", "memory.current")
        else:
            v = self._read("memory", "memory.max_usage_in_bytes")
        return int(v) if v and v.strip().isdigit() else 0

    def oom_kills(self) -> int:
        """How many processes the OOM killer killed in this cgroup (for this job)."""
        return self._oom_total() - self._oom_base

    def _oom_total(self) -> int:
        text = (self._read("unified", "memory.events") if self.host.version == 2
                else self._read("memory", "memory.oom_control")) or ""
        for line in text.splitlines():
            k, _, v = line.partition(" ")
            if k == "oom_kill":
                return int(v)
        return 0

    def cpu_ns(self) -> int | None:
        """CPU time of every process that ran in the cgroup, in ns (None if unknown)."""
        if self.host.version == 2:
            for line in (self._read("unified", "cpu.stat") or "").splitlines():
                if line.startswith("usage_usec "):
                    return int(line.split()[1]) * 1000
            return None
        v = self._read("cpuacct", "cpuacct.usage")
        return int(v) if v else None

    def pids(self) -> list[int]:
        """Every pid in the job cgroup (union over hierarchies)."""
        out: set[int] = set()
        for d in self.unique_dirs():
            try:
                out.update(int(x) for x in _read_text(d / "cgroup.procs").split())
            except OSError:
                pass
        return sorted(out)

    def kill_all(self, timeout: float = 2.0) -> bool:
        """SIGKILL everything in the cgroup; True once it is empty."""
        if self.host.version == 2 and (self.dirs["unified"] / "cgroup.kill").exists():
            try:
                _write(self.dirs["unified"] / "cgroup.kill", "1")
            except OSError:
                pass
        return kill_until_empty(self.pids, timeout)

    def remove(self) -> None:
        """Remove the job cgroup dirs (after kill_all). Retries briefly: the kernel
        drops exited tasks asynchronously."""
        for d in self.unique_dirs():
            for _ in range(50):
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
