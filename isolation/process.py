"""The ``process`` backend: a plain subprocess, hardened as far as a root worker can
without a container runtime.

As root, the child (between fork and exec) joins a fresh job cgroup (memory with swap
counted, pids, cpuacct), unshares network/mount/ipc/uts namespaces, gets a size-capped
tmpfs /tmp and /dev/shm, a read-only view of /, tmpfs over private host dirs (/root,
/work, ...) and over the other jobs' dirs, rlimits, and finally drops to an unprivileged
uid with no supplementary groups. Not root: rlimits and the process group only (the
probe lists what that leaves open).
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
import signal
import stat
from pathlib import Path

from . import linux, workdir
from . import devices_cgroup
from .devfs import STANDARD, PrivateDev
from .base import Backend, OutputCallback, Prepared, Probe
from .cgroups import CgroupUnavailable, JobCgroup, cpu_quota_gap, probe_gap
from .spec import Limits, Mount, Outcome, RunSpec, Status, mounts_problem
from .supervise import classify, job_rlimits, supervise
from .warm import DEFAULT_PRELOAD, WarmPool, existing_dirs, prepare_warm, run_warm, warm_mounts_problem

DEFAULT_HIDE = ("/root", "/home", "/work", "/mnt", "/media", "/srv", "/var/lib/docker",
                "/var/lib/postgresql", "/run/secrets")


class ProcessBackend(Backend):
    """Run jobs as plain processes. Options: ``uid``/``gid`` to run jobs as when root
    (default 65534), ``workdir_root`` (default /var/tmp/sandmill-jobs as root),
    ``cgroup_parent`` (default "sandmill"), ``hide`` (host dirs masked by an empty tmpfs),
    ``namespaces`` (False: no netns/mount ns even as root), ``warm`` (start jobs by fork
    from a warm interpreter when the host allows, default on; isolation/warm.py),
    ``warm_preload`` (modules the warm interpreter imports once) and
    ``warm_mount_roots`` (directories every job sees masked by an empty read-only tmpfs
    but for its own read-only mounts from under them, which then run warm too: the
    worker passes the python dependencies' environments)."""

    name = "process"

    def __init__(self, uid: int = 65534, gid: int | None = None, workdir_root: str | None = None,
                 cgroup_parent: str = "sandmill", hide: tuple[str, ...] = DEFAULT_HIDE,
                 namespaces: bool = True, warm: bool = True,
                 warm_preload: tuple[str, ...] | list[str] = DEFAULT_PRELOAD,
                 warm_mount_roots: tuple[str, ...] | list[str] = ()) -> None:
        self.root = os.geteuid() == 0
        self.uid = uid if self.root else None
        self.gid = (gid if gid is not None else uid) if self.root else None
        self.workdir_root = Path(workdir_root) if workdir_root else workdir.default_root()
        self.cgroup_parent = cgroup_parent
        self.hide = tuple(h for h in hide if os.path.isdir(h))
        self.namespaces = namespaces and self.root
        # Masked in every job, cold or warm (outside our other masks, which hide them anyway).
        self.mount_roots = tuple(r for r in existing_dirs(warm_mount_roots) if not any(
            _under(r, d) for d in self._masked())) if self.namespaces else ()
        self._cgroup_gap: str | None = probe_gap() if self.root else "not root"
        self._cpu_gap: str | None = cpu_quota_gap() if self.root else "not root"
        self._devices_gap = self._cgroup_gap or devices_cgroup.gap()  # GPU jobs' device cgroup
        # Warm runs need what makes them as isolated as a cold one: root, namespaces
        # and job cgroups.
        self.warm_pool: WarmPool | None = None
        if warm and self.namespaces and self._cgroup_gap is None:
            self.warm_pool = WarmPool(self._start_zygote, self.workdir_root, self.uid, self.gid,
                                      cgroup_parent=cgroup_parent, preload=tuple(warm_preload),
                                      mount_roots=self.mount_roots, native=True)

    def probe(self) -> Probe:
        """Available everywhere; the gaps depend on root, cgroups and namespaces."""
        gaps: dict[str, str] = {}
        cg = self._cgroup_gap
        if cg is not None:
            gaps["memory_limit_children"] = f"no job cgroup ({cg}); RLIMIT_AS is per process"
            gaps["fork_bomb"] = f"no pids cgroup ({cg}); RLIMIT_NPROC counts the whole uid"
            gaps["no_descendant_survives"] = (
                f"no job cgroup ({cg}); a daemon that calls setsid escapes the process-group sweep")
            gaps["cancel"] = gaps["no_descendant_survives"]
        if self._cpu_gap is not None:
            gaps["cpu_cores"] = f"no CPU quota ({self._cpu_gap}): a job may use every core"
        if self._devices_gap is not None:
            gaps[devices_cgroup.GAP_KEY] = f"no device cgroup for GPU jobs ({self._devices_gap})"
        if not self.root:
            gaps["no_network"] = "not root: no network namespace"
            gaps["tmp_size_limit"] = "not root: no tmpfs /tmp (TMPDIR is a per-job dir on disk)"
            gaps["no_outside_files"] = "not root: the job runs as the worker's own uid"
        elif not self.namespaces:
            gaps["no_network"] = "namespaces disabled"
            gaps["tmp_size_limit"] = "namespaces disabled: no tmpfs /tmp"
        return Probe(backend=self.name, available=True, gaps=gaps)

    def _warm(self, spec: RunSpec) -> str | None:
        """argv[0] resolved, when ``spec`` may run warm."""
        # A warm interpreter's namespaces are made before the job: its job process binds
        # read-only mounts from under the mount roots, or a host path onto itself, which
        # the warm interpreter sees as is (the host's / read-only; our masks were checked).
        if self.warm_pool is not None and spec.argv and spec.gpu is None and not (
                spec.mounts and warm_mounts_problem(spec.mounts, self.mount_roots, self_binds=True)):
            return shutil.which(spec.argv[0], path=spec.env.get("PATH", os.defpath)) or spec.argv[0]
        return None

    def prepare(self, spec: RunSpec, lane: object) -> Prepared | None:
        """A warm job's set-up while ``lane``'s job before it runs (warm_prepare.py)."""
        if self.warm_pool is None or self._mounts_problem(spec.mounts) or self._gpu_problem(spec):
            return None
        program = self._warm(spec)
        return prepare_warm(self.warm_pool, spec, lane, program) if program is not None else None

    async def run(self, spec: RunSpec, on_output: OutputCallback | None = None,
                  prepared: Prepared | None = None) -> Outcome:
        """Run ``spec`` in a fresh work dir; see the module docstring for the sandbox.
        ``prepared``: from ``prepare(spec)`` (the caller discards it after the run)."""
        if why := self._mounts_problem(spec.mounts) or self._gpu_problem(spec):
            return Outcome(Status.sandbox_error, detail=why)
        if (program := self._warm(spec)) is not None:
            out = await run_warm(self.warm_pool, spec, on_output, program, prepared=prepared)
            if out is not None:
                return out
        limits = spec.limits
        try:
            wd = workdir.create(self.workdir_root, spec.files, self.uid, self.gid)
        except (OSError, workdir.BadSpec) as e:
            return Outcome(Status.sandbox_error, detail=f"work dir: {e}")
        cgroup: JobCgroup | None = None
        try:
            if self._cgroup_gap is None:
                try:
                    cgroup = JobCgroup.create(
                        memory_bytes=limits.memory_bytes,
                        pids=limits.pids, parent=self.cgroup_parent, cpu_cores=limits.cpu_cores,
                        devices=self.device_rules(spec))
                except (CgroupUnavailable, OSError) as e:
                    return Outcome(Status.sandbox_error, detail=f"cgroup: {e}")
            env = dict(spec.env)
            if not self.namespaces:  # no private /tmp: a per-job dir beside the work dir
                tmp = wd.parent / f"{wd.name}-tmp"
                tmp.mkdir(mode=0o700)
                if self.uid is not None:
                    os.chown(tmp, self.uid, self.gid if self.gid is not None else -1)
                env.setdefault("TMPDIR", str(tmp))
            preexec = self._preexec(wd, limits, spec.network, cgroup, spec.mounts,
                                    PrivateDev(spec.gpu) if spec.gpu is not None else None)
            try:
                sup = await supervise(spec.argv, env=env, cwd=str(wd), stdin=spec.stdin,
                                      limits=limits, cgroup=cgroup, preexec=preexec,
                                      on_output=on_output)
            except (OSError, ValueError) as e:  # exec failed: no such file, bad argv
                return Outcome(Status.sandbox_error, detail=f"spawn: {e}")
            except Exception as e:  # SubprocessError from a failing preexec
                return Outcome(Status.sandbox_error, detail=f"spawn: {type(e).__name__}: {e}")
            files = workdir.collect(wd, spec.collect, limits.output_bytes)
            return classify(sup, limits, files)
        finally:
            if cgroup is not None:
                cgroup.kill_all()
                cgroup.remove()
            workdir.remove(wd)
            workdir.remove(wd.parent / f"{wd.name}-tmp")

    def device_rules(self, spec: RunSpec) -> list[str] | None:
        """A GPU job's device cgroup allow list: the nodes of its private /dev (devfs.py's
        standard ones and its GPU nodes); None (no device cgroup) for other jobs or where
        none applies."""
        if spec.gpu is None or self._devices_gap is not None:
            return None
        return devices_cgroup.rules([*("/dev/" + n for n in STANDARD), *(m.source for m in spec.gpu.devices)])

    def close(self) -> None:
        """Stop the warm interpreters."""
        if self.warm_pool is not None:
            self.warm_pool.close()

    async def _start_zygote(self, argv: list[str], zdir: Path, fd: int,
                            cgroup: JobCgroup | None) -> asyncio.subprocess.Process:
        """A warm interpreter in the same sandbox as a cold job, with ``zdir`` as its
        work dir; no rlimits of its own (each job sets its own)."""
        zlimits = Limits(memory_mb=None, pids=None, file_size_mb=None, open_files=None, tmp_mb=1)
        return await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            cwd=str(zdir), env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
            pass_fds=(fd,), start_new_session=True,
            preexec_fn=self._preexec(zdir, zlimits, "none", cgroup, masks_roots=False))

    def _mounts_problem(self, mounts: list[Mount]) -> str | None:
        """Why ``mounts`` cannot be made here: binds need our mount namespace, and land on
        paths that exist on the host and that no mask of ours covers."""
        if not mounts:
            return None
        if why := mounts_problem(mounts):
            return why
        if not self.namespaces:
            return "the process backend binds mounts only as root with namespaces"
        masked = self._masked()
        for m in mounts:
            if any(_under(r, m.source) for r in self.mount_roots):
                return f"mount source {m.source!r} holds {self.mount_roots}, which every job sees only its own part of"
            if any(_under(m.target, r) for r in self.mount_roots):
                continue  # its mount point is made in the root's mask
            if not os.path.lexists(m.target):
                return f"mount target {m.target!r} does not exist on the host (the process backend binds onto existing paths)"
            if any(m.target == d or m.target.startswith(d + "/") for d in masked):
                return f"mount target {m.target!r} is under {next(d for d in masked if m.target == d or m.target.startswith(d + '/'))!r}, which the sandbox masks"
        return None

    def _masked(self) -> tuple[str, ...]:
        return ("/tmp", "/dev/shm", str(workdir.shared_root(self.workdir_root)), *self.hide)

    def _gpu_problem(self, spec: RunSpec) -> str | None:
        """Why the GPUs of ``spec`` cannot be passed: hiding the host's other GPU nodes
        takes a private /dev, which takes our mount namespace."""
        if spec.gpu is None:
            return None
        if not self.namespaces:
            return "the process backend passes GPUs only as root with namespaces (a private /dev)"
        return mounts_problem(list(spec.gpu.devices)) or PrivateDev(spec.gpu).problem()

    def _preexec(self, wd: Path, limits: Limits, network: str, cgroup: JobCgroup | None,
                 mounts: list[Mount] = (), dev: PrivateDev | None = None, masks_roots: bool = True):
        """Build the fork-to-exec hook. Everything is computed here, in the parent: the
        child only makes syscalls. ``masks_roots``: mask the mount roots (every job; not
        the warm interpreter, whose job processes reach their sources there)."""
        procs = [p.encode() for p in cgroup.move_files()] if cgroup else []
        rl = job_rlimits(limits)
        if cgroup is None and limits.memory_mb is not None:
            n = limits.memory_bytes  # fallback: per process, virtual memory
            rl.append((resource.RLIMIT_AS, (n, n)))
        if cgroup is None and self.root and limits.pids is not None:
            # Counts every process of the uid, not just this job: only a backstop.
            rl.append((resource.RLIMIT_NPROC, (limits.pids, limits.pids)))

        ns_flags = 0
        if self.namespaces:
            ns_flags = linux.CLONE_NEWNS | linux.CLONE_NEWIPC | linux.CLONE_NEWUTS
            if network == "none":
                ns_flags |= linux.CLONE_NEWNET
        tmp_opt = (f"size={limits.tmp_mb}m,mode=1777" if limits.tmp_mb else "mode=1777").encode()
        hide = [h.encode() for h in self.hide]
        # Every worker's work dirs are masked, not only ours (they share this root).
        jobs_root = str(workdir.shared_root(self.workdir_root)).encode()
        wd_b = str(wd).encode()
        uid, gid = self.uid, self.gid
        do_mounts = self.namespaces
        nosuid_nodev = linux.MS_NOSUID | linux.MS_NODEV
        binds = [(m.source.encode(), m.target.encode(),
                  linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID | (0 if m.writable else linux.MS_RDONLY))
                 for m in mounts]
        roots = [r.encode() for r in self.mount_roots] if masks_roots else []
        # a bind target under a masked root gets its mount point made in the mask
        in_root = [any(_under(m.target, r) for r in self.mount_roots) for m in mounts]

        def preexec() -> None:
            for p in procs:  # join the job cgroup before exec: children inherit it
                fd = os.open(p, os.O_WRONLY)
                os.write(fd, b"0")
                os.close(fd)
            if ns_flags:
                linux.unshare(ns_flags)
            if do_mounts:
                linux.mount(None, b"/", None, linux.MS_REC | linux.MS_PRIVATE)
                here = os.open(b".", os.O_RDONLY | os.O_DIRECTORY)  # the work dir (cwd)
                # Sources are opened before the masks, which may cover them.
                srcs = [os.open(src, os.O_PATH | os.O_CLOEXEC) for src, _, _ in binds]
                dev_fds = dev.open_sources() if dev is not None else []
                linux.mount(b"tmpfs", b"/tmp", b"tmpfs", nosuid_nodev, tmp_opt)
                if dev is not None:  # a GPU job: only its own GPU nodes in its /dev
                    dev.make(dev_fds)
                linux.mount(b"tmpfs", b"/dev/shm", b"tmpfs", nosuid_nodev, tmp_opt)
                if dev is not None:
                    dev.seal()
                for h in hide:
                    linux.mount(b"tmpfs", h, b"tmpfs", nosuid_nodev | linux.MS_RDONLY,
                                b"size=4k,mode=755")
                # Mask every job dir, then bring back only ours at the same path.
                linux.mount(b"tmpfs", jobs_root, b"tmpfs", nosuid_nodev, b"size=64k,mode=711")
                os.makedirs(wd_b, 0o700)
                linux.mount(b"/proc/self/fd/%d" % here, wd_b, None, linux.MS_BIND)
                for r in roots:  # only the job's own mounts show through (read-only below)
                    linux.mount(b"tmpfs", r, b"tmpfs", nosuid_nodev | linux.MS_NOEXEC,
                                b"size=64k,nr_inodes=256,mode=755")
                for fd, (_, target, _f), made in zip(srcs, binds, in_root):
                    if made and not os.path.lexists(target):
                        os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                        if stat.S_ISDIR(os.fstat(fd).st_mode):
                            os.mkdir(target, 0o755)
                        else:
                            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                for fd, (_, target, flags) in zip(srcs, binds):
                    linux.mount(b"/proc/self/fd/%d" % fd, target, None, linux.MS_BIND)
                    linux.mount(None, target, None, flags)  # read-only unless writable
                    os.close(fd)
                for r in roots:
                    linux.mount(None, r, None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY
                                | nosuid_nodev | linux.MS_NOEXEC)
                linux.mount(None, b"/", None, linux.MS_REMOUNT | linux.MS_BIND | linux.MS_RDONLY)
                os.chdir(wd_b)
                os.close(here)
            for res_, lim in rl:
                resource.setrlimit(res_, lim)
            if uid is not None:
                os.setgroups([])
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
                linux.set_pdeathsig(signal.SIGKILL)  # after setuid, which clears it

        return preexec


def _under(path: str, d: str) -> bool:
    return path == d or path.startswith(d.rstrip("/") + "/")
