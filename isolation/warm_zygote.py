"""A warm interpreter as the worker sees it (``Zygote``): one per job running at once,
the socket protocol with ``zygote.py`` (messages R, F, Z; W, J, E, M on each job process's own socket), the job process's
cgroup hand-over and its kill. The pool and the run are in ``warm.py``."""

from __future__ import annotations

import array
import asyncio
import collections
import json
import os
import shutil
import signal
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .cgroups import CgroupUnavailable, JobCgroup


class WarmError(RuntimeError):
    """The warm path failed before any job code ran: the caller may run the job cold."""


class WarmSetupError(WarmError):
    """A job process could not set itself up (e.g. the kernel forbids unprivileged user
    namespaces): no warm run will work here."""


class WarmMountError(WarmError):
    """The job process could not make this job's mounts (e.g. a target that does not
    exist in the warm sandbox): this job runs cold, the zygote stays usable."""


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
    # [source, target] read-only binds, sources as the zygote sees them (warm.warm_mounts)
    mounts: list[list[str]] = field(default_factory=list)


class JobProc:
    """A job process the zygote forked ahead of its job (F), and its own socket."""

    def __init__(self, seq: int, sock: socket.socket, ended: asyncio.Future[int]) -> None:
        self.seq = seq  # its number in the zygote's Z messages
        self.sock = sock  # our end of its socket pair (SO_PASSCRED)
        self.ended = ended  # its wait status, from the zygote's Z

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Zygote:
    """One warm interpreter; one job at a time.

    Moving a process between cgroups is slow on some kernels (cgroup v1 waits for an RCU
    grace period; docs/performance.md), so no job waits for it: while idle, the zygote
    already sits in the cgroup its next job will use (``next_cgroup``), and its next job
    process is already forked there (``ahead``), set up and waiting for its job. When a
    job starts, the zygote moves on to another cgroup (``_moving``, in a thread) and forks
    the process of the job after it there, while this job runs: on cgroup v1 a cgroup its
    last jobs emptied and that was reset (``spare``, warm.py's after-job work;
    JobCgroup.recycle), else a fresh one. The zygote's own memory stays charged to its
    home cgroup, where it was first touched.
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
        # emptied job cgroups made ready again (JobCgroup.recycle): the next ones, before a
        # fresh one (appended from the after-job thread; a deque's append is thread-safe)
        self.spare: collections.deque[JobCgroup] = collections.deque()
        self._moving: asyncio.Future[None] | None = None
        self.ahead: JobProc | None = None  # forked, waiting for its job
        self.current: JobProc | None = None  # the one that got the last job
        self._seq = 0
        self._ends: dict[int, asyncio.Future[int]] = {}  # seq -> its Z's wait status
        self.job_pidfd: int | None = None  # the running job process (pid 1 of its namespaces)
        self._reading: asyncio.AbstractEventLoop | None = None  # our reader is registered there
        self.pending: asyncio.Future[None] | None = None  # after-job work (warm.py)
        self.cleanups: collections.deque[asyncio.Future[None]] = collections.deque()
        self.broken = False
        self.job_sent = False  # the running job's J went out: its code may have run

    async def recv_ready(self) -> None:
        """The zygote's first message (R, with its pid); then its messages are read as
        they come (``_on_message``)."""
        msg, self.pid = await _recv(self.sock)
        if msg != b"R" or self.pid is None:
            raise WarmError(f"unexpected first message {msg[:200]!r}")
        loop = asyncio.get_running_loop()
        loop.add_reader(self.sock.fileno(), self._on_message)
        self._reading = loop

    def _on_message(self) -> None:
        while True:
            try:
                data = self.sock.recv(64)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if data[:1] == b"Z" and len(data) == 9:
                seq, status = struct.unpack("ii", data[1:])
                fut = self._ends.pop(seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(status)
                continue
            # the zygote is gone (or says what it never says): every job process with it
            self.broken = True
            self._stop_reading()
            for fut in self._ends.values():
                if not fut.done():
                    fut.set_exception(WarmError(f"the warm interpreter exited (status {self.proc.returncode})"
                                                if not data else f"unexpected message {data[:200]!r}"))
                    fut.exception()  # retrieved here: nobody may be waiting for it
            self._ends.clear()
            return

    def _stop_reading(self) -> None:
        # Only while the socket is open: after close() its fd number may belong to
        # another job's pipe, whose reader must not be removed.
        if self._reading is not None:
            self._reading.remove_reader(self.sock.fileno())
            self._reading = None

    def _fork(self) -> None:
        """Have the zygote fork a job process ahead of its job, into the cgroup it sits
        in, with a socket of its own."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # its W carries its pid
            ours.setblocking(False)
            self._seq += 1
            ended: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._ends[self._seq] = ended
            self.sock.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", [theirs.fileno()]))])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.ahead = JobProc(self._seq, ours, ended)

    def _move_to_next(self) -> None:
        """(In a thread.) The next job's cgroup (a recycled one, else a fresh one),
        with the zygote in it."""
        assert self.pid is not None
        try:
            cg = self.spare.popleft()
        except IndexError:
            cg = JobCgroup.create(memory_bytes=None, pids=None, parent=self.cgroup_parent)
        try:
            cg.add(self.pid)
        except BaseException:
            cg.remove()
            raise
        self.next_cgroup = cg

    async def _advance(self, fork: bool) -> None:
        await asyncio.to_thread(self._move_to_next)
        if fork and not self.broken:
            self._fork()

    def advance(self, fork: bool) -> None:
        """Start moving into the next job's cgroup (see the class docstring); with
        ``fork``, then have the next job process forked there ahead of its job."""
        self._moving = asyncio.ensure_future(self._advance(fork))
        # a zygote closed (or dead) before settle() never awaits it: its error is no news
        self._moving.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def settle(self) -> None:
        """Wait for the move: the zygote is out of the last job's cgroup (which may now
        be swept) and in the next one."""
        if self._moving is not None:
            moving = self._moving
            try:
                await moving
            except (OSError, CgroupUnavailable):
                self.broken = True
            if self._moving is moving:
                self._moving = None

    async def take_cgroup(self) -> JobCgroup:
        """The cgroup the next job runs in (its process is already there, waiting)."""
        await self.settle()
        cg, self.next_cgroup = self.next_cgroup, None
        if cg is None or self.broken:
            self.broken = True
            raise WarmError("no job cgroup prepared")
        return cg

    async def start_job(self, req: JobRequest, fds: list[int], cgroup: JobCgroup, *,
                        fork_ahead: bool = True) -> None:
        """Hand the waiting job process its job and fds (once it is sure to be in
        ``cgroup``); the zygote moves on to the next cgroup meanwhile and, with
        ``fork_ahead``, forks the next job's process there while this job runs."""
        self.job_sent = False
        jp, self.ahead = self.ahead, None
        try:
            if jp is None:
                raise WarmError("no job process forked ahead")
            self.current = jp
            msg, pid = await _recv(jp.sock)
            if msg[:1] == b"E":
                raise WarmSetupError(f"warm job setup failed: {msg[1:].decode(errors='replace')}")
            if msg != b"W" or pid is None:
                raise WarmError(f"unexpected message from the warm job process: {msg[:200]!r}")
            self.job_pidfd = os.pidfd_open(pid)  # from here on, this very process
            with open(f"/proc/{pid}/cgroup") as f:
                if cgroup.unique_dirs()[0].name not in f.read():
                    raise WarmError("the job process is not in its job cgroup")
            payload = b"J" + json.dumps(req.__dict__).encode()
            jp.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", fds))])
            self.job_sent = True
        except (OSError, WarmError):
            self.broken = True
            raise
        self.advance(fork=fork_ahead)

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
        """After a job: once the zygote is out of the job's cgroup, and unless the next
        job process was forked ahead, have it forked now."""
        try:
            await self.settle()
            if not self.broken and self.ahead is None:
                self._fork()
        except (OSError, WarmError):
            self.broken = True

    async def wait_job(self) -> int:
        """The job's end, as asyncio reports a returncode (-N for signal N). Raises
        WarmError when the setup failed before the job's code ran."""
        jp = self.current
        assert jp is not None
        setup_error = mount_error = ""
        try:
            while True:  # its socket closes as the job's own code starts (or the process ends)
                msg, _ = await _recv(jp.sock, eof_ok=True)
                if not msg:
                    break
                if msg[:1] == b"E":
                    setup_error = msg[1:].decode(errors="replace")
                elif msg[:1] == b"M":
                    mount_error = msg[1:].decode(errors="replace")
            status = await jp.ended
        except BaseException:
            self.broken = True
            raise
        finally:
            self._close_pidfd()
            jp.close()
            self.current = None
        if setup_error:
            raise WarmSetupError(f"warm job setup failed: {setup_error}")
        if mount_error:
            raise WarmMountError(f"warm job mounts: {mount_error}")
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        """Stop it: closing the socket ends the zygote (and any job, by parent death)."""
        self.broken = True
        self._stop_reading()
        self._close_pidfd()
        for jp in (self.ahead, self.current):
            if jp is not None:
                jp.close()
        self.ahead = self.current = None
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        spare, self.spare = list(self.spare), collections.deque()
        for cg in (self.next_cgroup, self.home, *spare):
            if cg is not None:
                cg.kill_all(timeout=0.5)
                cg.remove()
        self.next_cgroup = None
        shutil.rmtree(self.dir, ignore_errors=True)


async def _recv(sock: socket.socket, *, eof_ok: bool = False) -> tuple[bytes, int | None]:
    """One message on ``sock`` (non-blocking) and the sender's pid (in our pid namespace)
    when attached. The end of the socket is WarmError unless ``eof_ok`` (then b"")."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    while True:
        try:
            data, anc, _flags, _ = sock.recvmsg(8192, socket.CMSG_SPACE(12))
            break
        except BlockingIOError:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _set_once, readable)
            try:
                await readable
            finally:
                loop.remove_reader(fd)
    if not data and not eof_ok:
        raise WarmError("the warm interpreter (or its job process) went away")
    pid = None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("iII", payload[:12])[0]
    return data, pid
