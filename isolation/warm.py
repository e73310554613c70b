"""Warm Python: run python3 jobs by fork from a pre-started interpreter, not by exec.

A fork of a warm interpreter is far cheaper than a fresh interpreter's start (figures in
docs/performance.md, "Warm zygote"). The warm interpreter (``zygote.py``) runs inside
the same sandbox a cold job gets (the backend starts it: nsjail, or the process
backend's namespaces), and each job is a fork of it that goes on into fresh user, mount,
pid, net, ipc and uts namespaces of its own, with its own work dir, /tmp, /proc and job
cgroup (the worker moves the job process into the cgroup before it forks the job), and
no capabilities.

This module is the worker's side: a pool of zygotes per interpreter (one per job
running at once), the socket protocol (see zygote.py), and a ``launch`` for
``supervise.supervise_launch`` so that output caps, deadlines and the sweep are the
same code as for a cold job.
"""

from __future__ import annotations

import array
import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import struct
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from . import workdir
from .base import OutputCallback
from .cgroups import CgroupUnavailable, JobCgroup
from .spec import Outcome, RunSpec, Status
from .supervise import Launched, classify, job_rlimits, supervise_launch

log = logging.getLogger(__name__)

ZYGOTE_SOURCE = resources.files("sandmill.isolation").joinpath("zygote.py").read_text()
# Imported once by each zygote, so jobs that use them skip the import.
DEFAULT_PRELOAD = ("json", "re", "traceback", "typing", "datetime", "collections",
                   "functools", "itertools", "base64", "hashlib", "random", "math")
START_TIMEOUT_S = 10.0
PYTHON_FLAGS = ("-u", "-B")  # flags a warm run may carry: the zygote runs with them


class WarmError(RuntimeError):
    """The warm path failed before any job code ran: the caller may run the job cold."""


class WarmSetupError(WarmError):
    """A job process could not set itself up (e.g. the kernel forbids unprivileged user
    namespaces): no warm run will work here."""


# A backend's way of starting one zygote: (argv tail to run, zygote dir, socket fd to
# pass, cgroup to put it in) -> the started process. The argv tail is the interpreter
# command; the backend wraps it in its sandbox.
Starter = Callable[[list[str], Path, int, JobCgroup | None], Awaitable[asyncio.subprocess.Process]]


def warm_script(spec: RunSpec) -> str | None:
    """The runtime script a warm interpreter may run in-process: ``spec.warm`` when argv
    is ``[python, (-u|-B)*, spec.warm, args...]``; else None (the program is exec'd)."""
    if not spec.warm:
        return None
    rest = spec.argv[1:]
    while rest and rest[0] in PYTHON_FLAGS:
        rest = rest[1:]
    if not rest or rest[0] != spec.warm or spec.warm not in spec.files:
        return None
    return spec.warm


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class JobRequest:
    """What the job process needs to know (sent to the zygote's child, never to it)."""

    dir: str  # the job's dir as the zygote sees it
    mount: str  # the shared jobs dir, where the job dir is bound (its cwd)
    argv: list[str]
    env: dict[str, str]
    rlimits: list[tuple[int, int, int]]
    tmp_bytes: int | None
    hostname: str | None = None
    exec: list[str] | None = None  # exec this argv instead of running argv[0] in-process


class Zygote:
    """One warm interpreter; one job at a time.

    Moving a process between cgroups is slow on some kernels (cgroup v1 waits for an RCU
    grace period; docs/performance.md), so no job waits for it: while idle, the zygote
    already sits in the cgroup its next job will use (``next_cgroup``), its job process
    is forked straight into it, and the zygote moves on to a fresh one (``_moving``, in
    a thread) while that job runs. The zygote's own memory stays charged to its home
    cgroup, where it was first touched.
    """

    def __init__(self, key: tuple[str, bytes], proc: asyncio.subprocess.Process,
                 sock: socket.socket, zdir: Path, home: JobCgroup, cgroup_parent: str) -> None:
        self.key = key  # (interpreter, runtime script) it serves
        self.proc = proc
        self.sock = sock
        self.dir = zdir
        self.home = home
        self.cgroup_parent = cgroup_parent
        self.pid: int | None = None  # the interpreter's pid as we see it (not nsjail's)
        self.next_cgroup: JobCgroup | None = None
        self._moving: asyncio.Future[None] | None = None
        self.job_pidfd: int | None = None  # the running job process (pid 1 of its namespaces)
        self._reading: asyncio.AbstractEventLoop | None = None  # a reader is registered there
        self._reaped = False  # the zygote reported its last child gone (Z)
        self.pending: asyncio.Future[None] | None = None  # after-job work still running
        self.broken = False

    async def _recv(self) -> tuple[bytes, int | None]:
        """One message and the sender's pid (in our pid namespace) when attached."""
        loop = asyncio.get_running_loop()
        fd = self.sock.fileno()
        while True:
            try:
                data, anc, _flags, _ = self.sock.recvmsg(8192, socket.CMSG_SPACE(12))
                break
            except BlockingIOError:
                readable: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, _set_once, readable)
                self._reading = loop
                try:
                    await readable
                finally:
                    self._stop_reading()
        if not data:
            self.broken = True
            await asyncio.sleep(0.05)  # let the exit status arrive, for the message
            raise WarmError(f"the warm interpreter exited (status {self.proc.returncode})")
        pid = None
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        return data, pid

    def _stop_reading(self) -> None:
        # Only while the socket is open: after close() its fd number may belong to
        # another job's pipe, whose reader must not be removed.
        if self._reading is not None:
            self._reading.remove_reader(self.sock.fileno())
            self._reading = None

    def _move_to_next(self) -> None:
        """(In a thread.) A fresh cgroup for the next job, with the zygote in it."""
        assert self.pid is not None
        cg = JobCgroup.create(memory_bytes=None, pids=None, parent=self.cgroup_parent)
        try:
            cg.add(self.pid)
        except BaseException:
            cg.remove()
            raise
        self.next_cgroup = cg

    async def _advance(self, fork: bool) -> None:
        await asyncio.to_thread(self._move_to_next)
        if fork:
            self.sock.send(b"F")

    def advance(self, fork: bool) -> None:
        """Start moving into the next job's cgroup (see the class docstring); with
        ``fork``, then have the next job process forked there ahead of its job."""
        self._moving = asyncio.ensure_future(self._advance(fork))

    async def settle(self) -> None:
        """Wait for the move: the zygote is out of the last job's cgroup (which may now
        be swept) and in the next one."""
        if self._moving is not None:
            try:
                await self._moving
            except (OSError, CgroupUnavailable):
                self.broken = True
            self._moving = None

    async def take_cgroup(self) -> JobCgroup:
        """The cgroup the next job runs in (its process is already there, waiting)."""
        await self.settle()
        cg, self.next_cgroup = self.next_cgroup, None
        if cg is None or self.broken:
            self.broken = True
            raise WarmError("no job cgroup prepared")
        return cg

    async def start_job(self, req: JobRequest, fds: list[int], cgroup: JobCgroup) -> None:
        """Hand the waiting job process its job and fds (once it is sure to be in
        ``cgroup``); the zygote moves on to the next cgroup meanwhile."""
        try:
            msg, pid = await self._recv()
            if msg[:1] == b"E":
                raise WarmSetupError(f"warm job setup failed: {msg[1:].decode(errors='replace')}")
            if msg != b"W" or pid is None:
                raise WarmError(f"unexpected message from the warm interpreter: {msg[:200]!r}")
            self.job_pidfd = os.pidfd_open(pid)  # from here on, this very process
            with open(f"/proc/{pid}/cgroup") as f:
                if cgroup.unique_dirs()[0].name not in f.read():
                    raise WarmError("the job process is not in its job cgroup")
            payload = b"J" + json.dumps(req.__dict__).encode()
            self.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", fds))])
        except (OSError, WarmError):
            self.broken = True
            raise
        self.advance(fork=False)

    def kill_job(self) -> None:
        """SIGKILL the job process: pid 1 of its pid namespace, so every process of the
        job dies with it. (Not the cgroup: the zygote may still be in it for a moment.)"""
        if self.job_pidfd is not None:
            try:
                signal.pidfd_send_signal(self.job_pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _close_pidfd(self) -> None:
        if self.job_pidfd is not None:
            os.close(self.job_pidfd)
            self.job_pidfd = None

    async def job_done(self) -> None:
        """After a job: once the zygote has reaped its child (Z) and is out of the job's
        cgroup, have it fork the next job process."""
        try:
            while not self._reaped:
                msg, _ = await self._recv()
                self._reaped = msg[:1] == b"Z"
            await self.settle()
            if not self.broken:
                self.sock.send(b"F")
                self._reaped = False
        except (OSError, WarmError):
            self.broken = True

    async def wait_job(self) -> int:
        """The job's end, as asyncio reports a returncode (-N for signal N). Raises
        WarmError when the setup failed before the job's code ran. Returns on the job
        process's end (X): the zygote's note that the child is gone (Z) is read after."""
        status: int | None = None
        setup_error = ""
        try:
            while True:
                msg, _ = await self._recv()
                kind, body = msg[:1], msg[1:]
                if kind == b"X":
                    status = struct.unpack("i", body)[0]
                    break
                if kind == b"E":
                    setup_error = body.decode(errors="replace")
                elif kind == b"Z":
                    self._reaped = True
                    if not setup_error:
                        status = struct.unpack("i", body)[0]  # the child was killed
                    break
        except BaseException:
            self.broken = True
            raise
        finally:
            self._close_pidfd()
        if setup_error:
            raise WarmSetupError(f"warm job setup failed: {setup_error}")
        assert status is not None
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        """Stop it: closing the socket ends the zygote (and any job, by parent death)."""
        self.broken = True
        self._stop_reading()
        self._close_pidfd()
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        for cg in (self.next_cgroup, self.home):
            if cg is not None:
                cg.kill_all(timeout=0.5)
                cg.remove()
        self.next_cgroup = None
        shutil.rmtree(self.dir, ignore_errors=True)


class WarmPool:
    """Zygotes for one backend, started on first use, one per job running at once.

    ``starter`` launches the interpreter in the backend's sandbox. ``uid``/``gid`` own
    the zygote's jobs dir. The first failure to start (or a setup failure of a job,
    e.g. where the kernel forbids unprivileged user namespaces) turns the pool off:
    ``disabled`` says why, and jobs run cold from then on.
    """

    def __init__(self, starter: Starter, root: Path, uid: int | None, gid: int | None, *,
                 mount_at: str | None = None, hostname: str | None = None,
                 cgroup_parent: str = "sandmill", preload: tuple[str, ...] = DEFAULT_PRELOAD,
                 memory_mb: int = 256, python: str = "/usr/bin/python3") -> None:
        self.starter = starter
        self.root = root
        self.mount_at = mount_at  # where a zygote sees its dir (None: at the same path)
        self.python = python  # the interpreter of the zygotes that exec other programs
        self.hostname = hostname
        self.cgroup_parent = cgroup_parent
        self.uid = uid
        self.gid = gid
        self.preload = preload
        self.memory_mb = memory_mb
        self.idle: dict[tuple[str, bytes], list[Zygote]] = {}
        self.disabled: str | None = None

    async def acquire(self, python: str, script: str, source: bytes) -> Zygote:
        """An idle zygote for ``python`` with ``source`` (the runtime script, named
        ``script``) compiled, or a new one. Raises WarmError."""
        if self.disabled:
            raise WarmError(self.disabled)
        key = (python, source)
        idle = self.idle.setdefault(key, [])
        while idle:
            z = idle.pop()
            if z.pending is not None:
                await z.pending  # its last job's clean-up and the next job process's fork
                z.pending = None
            if not z.broken and z.proc.returncode is None:
                return z
            z.close()
        try:
            return await self._start(key, script)
        except WarmError as e:
            self.disable(str(e))
            raise

    def release(self, z: Zygote) -> None:
        """Give ``z`` back after a job that ended normally; a broken one is closed."""
        if z.broken or z.proc.returncode is not None or self.disabled:
            z.close()
        else:
            self.idle.setdefault(z.key, []).append(z)

    def disable(self, why: str) -> None:
        if self.disabled is None:
            log.warning("warm python off, jobs run cold: %s", why)
            self.disabled = why
        self.close()

    def close(self) -> None:
        """Stop every idle zygote."""
        for zs in self.idle.values():
            for z in zs:
                z.close()
        self.idle.clear()

    async def _start(self, key: tuple[str, bytes], script: str) -> Zygote:
        python, source = key
        zdir = self.root / f"warm-{uuid.uuid4().hex[:12]}"
        zdir.mkdir(parents=True, mode=0o700)
        if self.uid is not None:
            os.chown(zdir, self.uid, self.gid if self.gid is not None else -1)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        ours.setblocking(False)
        cgroup: JobCgroup | None = None
        proc = None
        try:
            cgroup = JobCgroup.create(memory_bytes=self.memory_mb * 1024 * 1024, pids=64,
                                      parent=self.cgroup_parent, prefix="warm")
            argv = [python, *PYTHON_FLAGS, "-E", "-s", "-c", ZYGOTE_SOURCE,
                    str(theirs.fileno()), ",".join(self.preload), script,
                    source.decode(errors="surrogateescape")]
            proc = await self.starter(argv, zdir, theirs.fileno(), cgroup)
            theirs.close()
            z = Zygote(key, proc, ours, zdir, cgroup, self.cgroup_parent)
            msg, z.pid = await asyncio.wait_for(z._recv(), START_TIMEOUT_S)
            if msg != b"R" or z.pid is None:
                raise WarmError(f"unexpected first message {msg[:200]!r}")
            z.advance(fork=True)
            return z
        except (OSError, WarmError, CgroupUnavailable, TimeoutError, ValueError) as e:
            theirs.close()
            ours.close()
            if proc is not None and proc.returncode is None:
                proc.kill()
            if cgroup is not None:
                cgroup.kill_all(timeout=0.5)
                cgroup.remove()
            shutil.rmtree(zdir, ignore_errors=True)
            raise WarmError(f"cannot start a warm interpreter ({python}): "
                            f"{type(e).__name__}: {e}") from None


def make_launch(z: Zygote, req: JobRequest, cgroup: JobCgroup):
    """A ``supervise_launch`` launcher that runs ``req`` in ``z``."""

    async def launch(stdin_fd: int | None, out_w: int, err_w: int) -> Launched:
        null = os.open(os.devnull, os.O_RDONLY) if stdin_fd is None else None
        try:
            await z.start_job(req, [stdin_fd if null is None else null, out_w, err_w], cgroup)
        finally:
            if null is not None:
                os.close(null)
        return Launched(wait=z.wait_job(), pgid=None, kill=z.kill_job, sweep=False)

    return launch


async def run_warm(pool: WarmPool, spec: RunSpec, on_output: OutputCallback | None,
                   program: str, can_exec: bool = True) -> Outcome | None:
    """Run ``spec`` warm; None when it must run cold instead (network on, pool off, or
    the warm path failed before any of the job's code ran). ``program`` is argv[0]
    resolved to a path. A spec with a runtime script (``spec.warm``) runs in-process in a
    warm ``program``; any other is exec'd by a forked job process (``can_exec``: the
    backend says ``program`` is visible in the sandbox), which still skips the sandbox
    set-up and the cgroup move."""
    if pool.disabled or spec.network != "none" or not spec.argv:
        return None
    script = warm_script(spec)
    exec_argv: list[str] | None = None
    if script is not None:
        key: tuple[str, str, bytes] = (program, script, spec.files[script])
    elif can_exec and os.path.isabs(program) and os.access(program, os.X_OK):
        key, exec_argv = (pool.python, "", b""), [program, *spec.argv[1:]]
    else:
        return None
    limits = spec.limits
    try:
        z = await pool.acquire(*key)
    except WarmError:
        return None
    wd: Path | None = None
    cgroup: JobCgroup | None = None
    try:
        try:
            wd = workdir.create(z.dir, spec.files, pool.uid, pool.gid)
        except (OSError, workdir.BadSpec) as e:
            return Outcome(Status.sandbox_error, detail=f"work dir: {e}")
        try:
            cgroup = await z.take_cgroup()
            # The zygote is in the cgroup too until it moves on, and on a machine without
            # a raw clone the job process has a parent there: a job may then have one
            # process less than its limit, never more.
            cgroup.set_limits(limits.memory_mb * 1024 * 1024 if limits.memory_mb else None,
                              limits.pids, limits.cpu_cores)
        except (WarmError, OSError) as e:
            z.broken = True
            return Outcome(Status.sandbox_error, detail=f"cgroup: {e}")
        mount = pool.mount_at or str(z.dir)
        req = JobRequest(
            dir=f"{mount}/{wd.name}", mount=mount,
            argv=spec.argv[spec.argv.index(script, 1):] if script else [], env=dict(spec.env),
            rlimits=[(r, s, h) for r, (s, h) in job_rlimits(limits)],
            tmp_bytes=limits.tmp_mb * 1024 * 1024 if limits.tmp_mb else None,
            hostname=pool.hostname, exec=exec_argv)
        try:
            sup = await supervise_launch(make_launch(z, req, cgroup), stdin=spec.stdin,
                                         limits=limits, cgroup=cgroup, on_output=on_output)
        except WarmSetupError as e:
            pool.disable(str(e))  # e.g. no unprivileged user namespaces on this kernel
            return None
        except (WarmError, OSError) as e:  # this zygote only: the next job gets a new one
            log.warning("warm run failed before the job started, running it cold: %s", e)
            z.broken = True
            return None
        except BaseException:  # cancelled: its messages are unread, it cannot be reused
            z.broken = True
            raise
        files = workdir.collect(wd, spec.collect, limits.output_bytes)
        out = classify(sup, limits, files)
        out.warm = True
        return out
    finally:
        if not z.broken and cgroup is not None and wd is not None:
            # After the result: the zygote reaps its child, leaves the job's cgroup and
            # forks the next job process; then the cgroup and work dir go (the next
            # acquire of this zygote waits for all that).
            z.pending = asyncio.ensure_future(_after_job(z, cgroup, wd))
            cgroup = wd = None
        if cgroup is not None:
            await z.settle()  # never sweep the zygote along with the job
            cgroup.kill_all()
            cgroup.remove()
        if wd is not None:
            workdir.remove(wd)
        pool.release(z)


async def _after_job(z: Zygote, cgroup: JobCgroup, wd: Path) -> None:
    await z.job_done()
    await asyncio.to_thread(_remove, cgroup, wd)


def _remove(cgroup: JobCgroup, wd: Path) -> None:
    cgroup.kill_all()
    cgroup.remove()
    workdir.remove(wd)
