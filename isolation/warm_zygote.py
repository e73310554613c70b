"""A warm interpreter as the worker sees it (``Zygote``): one per job running at once,
the zygote protocol (isolation/README.md), the job process's cgroup hand-over and its
kill. The pool and the run are in ``warm.py``."""

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
from collections.abc import Callable
from pathlib import Path

from . import launcher
from .cgroups import CgroupUnavailable, JobCgroup
from .warm_proto import (
    JobProc,
    JobRequest,
    WarmError,
    WarmMountError,
    WarmSetupError,
    recv,
)

__all__ = ["JobProc", "JobRequest", "WarmError", "WarmMountError", "WarmSetupError", "Zygote"]

# Job processes forked ahead of their jobs: 2, so that a clone and set-up (in a Python
# zygote 2-3 ms, longer than a short job) have two jobs' time to finish;
# SANDMILL_FORK_AHEAD=N sets another depth (docs/performance.md, rounds 7 and 8).
FORK_DEPTH = max(1, int(os.environ.get("SANDMILL_FORK_AHEAD", "2") or 2))
# Clean-ups (a job's leftovers, after its step's move) that may be under way when a job
# starts; beyond, it waits for one to be over: clean-ups slower than the jobs pile up no further.
MAX_CLEANUPS_BEHIND = 2


class Zygote:
    """One warm interpreter; one job at a time.

    No job waits for a cgroup move. The zygote forks each job process ahead of its job
    (``forked``: each sets itself up and waits, alone in its own cgroup) into the cgroup
    it sits in (``zcg``), and moves itself on first (M, then F: it reads them in order;
    on cgroup v1 a process that moves itself takes no global lock, docs/performance.md,
    "Round 8"), into a recycled cgroup (``spare``) or a fresh one. After each job a
    thread step (``after_job``) removes the job's leftovers once the zygote's answer to
    the M out of its cgroup has come. Its own memory stays charged to its home cgroup.
    """

    def __init__(self, key: tuple[str, bytes], proc: asyncio.subprocess.Process,
                 sock: socket.socket, zdir: Path, home: JobCgroup, cgroup_parent: str, *,
                 native: bool = False) -> None:
        self.key = key  # (interpreter, runtime script) it serves
        self.native = native  # the native exec zygote (launcher.c): jobs go as K, not J
        self.proc = proc
        self.sock = sock
        self.dir = zdir
        self.home = home
        self.cgroup_parent = cgroup_parent
        self.pid: int | None = None  # the interpreter's pid as we see it (not nsjail's)
        self.zcg: JobCgroup | None = None  # where the zygote sits: its next job process's
        # emptied job cgroups made ready again (JobCgroup.recycle), before a fresh one
        self.spare: collections.deque[JobCgroup] = collections.deque()
        # thread steps started and not over yet, oldest first
        self._pending: collections.deque[asyncio.Future[None]] = collections.deque()
        self._moved: collections.deque[asyncio.Future[None]] = collections.deque()  # Ms not yet answered
        self._left: dict[JobCgroup, asyncio.Future[None]] = {}  # a cgroup -> the answer to the M out of it
        self._ended_ns: list[int] = []  # namespaces of ended jobs, freed by the next step
        # forked, each waiting for its job, the next job's first (at most FORK_DEPTH)
        self.forked: collections.deque[JobProc] = collections.deque()
        self._cleaning = 0  # steps with a clean-up in their thread (its move first), not over yet
        self._last: JobProc | None = None  # the last one asked for
        self.current: JobProc | None = None  # the one that got the last job
        self._seq = 0
        self._ends: dict[int, asyncio.Future[int]] = {}  # seq -> its Z's wait status
        self.job_pidfd: int | None = None  # the running job process (pid 1 of its namespaces)
        self._reading: asyncio.AbstractEventLoop | None = None  # our reader is registered there
        self.broken = False
        self.job_sent = False  # the running job's J went out: its code may have run

    async def recv_ready(self) -> None:
        """The zygote's first message (R, with its pid); then its messages are read as
        they come (``_on_message``)."""
        msg, self.pid = await recv(self.sock)
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
            if data == b"m":  # a move is over (they are answered in order)
                if self._moved:
                    self._moved.popleft().set_result(None)
                continue
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
            for left in self._moved:  # a step waiting for one finds us broken
                left.set_exception(WarmError("the warm interpreter exited"))
                left.exception()
            self._moved.clear()
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
        assert self.zcg is not None
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
        self._last = jp = JobProc(self._seq, ours, ended, self.zcg)
        self.forked.append(jp)

    @property
    def ahead(self) -> JobProc | None:
        """The job process forked for the next job (None: not forked yet)."""
        return self.forked[0] if self.forked else None

    def _waiting(self) -> int:
        return len(self.forked)

    def _fresh(self) -> bool:
        """The zygote sits in a cgroup where no job process was forked yet: the one place
        to fork into, and not one to move out of (it would be left behind)."""
        return self.zcg is not None and (self._last is None or self._last.cgroup is not self.zcg)

    def _move(self) -> None:
        """Have the zygote move itself (M) into another cgroup, a recycled one, else a
        fresh one; not out of a fresh one. The zygote reads its messages in order: an F
        after it clones into that cgroup. Its "m" says it has left the one before
        (``out_of``)."""
        if self.broken or self._fresh():
            return
        try:
            cg = self.spare.popleft()
        except IndexError:
            cg = JobCgroup.create(memory_bytes=None, pids=None, parent=self.cgroup_parent)
        fds: list[int] = []
        try:
            fds = [os.open(f, os.O_WRONLY | os.O_CLOEXEC) for f in cg.move_files()]
            self.sock.sendmsg([b"M"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        except BaseException:
            cg.remove()
            raise
        finally:
            for fd in fds:
                os.close(fd)
        left = asyncio.get_running_loop().create_future()
        self._moved.append(left)
        if self.zcg is not None:
            self._left[self.zcg] = left
        self.zcg = cg

    async def out_of(self, cg: JobCgroup) -> None:
        """Once the zygote has left ``cg`` (it may then be swept); it moves on if it sits
        there. Raises WarmError when it died meanwhile."""
        if self.zcg is cg:
            self._move()
        left = self._left.pop(cg, None)
        if left is not None:
            await asyncio.shield(left)

    def _begin_step(self, cgroup: JobCgroup, cleanup: Callable[[], None] | None) -> None:
        """Start a thread step: ``cleanup`` (a job's leftovers: its work dir, ``cgroup``)
        and the namespaces held for the jobs that ended, once the zygote has left
        ``cgroup`` (its "m"). Steps do not wait for each other: each has its own job's."""
        held, self._ended_ns = self._ended_ns, []

        def tidy() -> None:
            for fd in held:  # first: the job's /tmp is then uncharged before its cgroup's reset
                os.close(fd)
            if cleanup is not None:
                cleanup()
            if not self.spare and not self.broken:
                self._stock_spare()  # here, so that the next move makes none on the loop

        async def step() -> None:
            try:
                await self.out_of(cgroup)
                self._cleaning += 1
                try:
                    await asyncio.to_thread(tidy)
                finally:
                    self._cleaning -= 1
            except (OSError, CgroupUnavailable, WarmError):
                self.broken = True
                raise

        t = asyncio.ensure_future(step())
        self._pending.append(t)
        # a zygote closed (or dead) before settle() never awaits it: its error is no news
        t.add_done_callback(lambda f: self._pending.remove(f) or f.cancelled() or f.exception())

    def _stock_spare(self) -> None:
        """(In a thread.) One more empty job cgroup for the moves to come."""
        cg = JobCgroup.create(memory_bytes=None, pids=None, parent=self.cgroup_parent)
        self.spare.append(cg)
        if self.broken:  # closed meanwhile: close() may have missed it
            try:
                self.spare.remove(cg)
            except ValueError:
                return  # close() took it
            cg.remove()

    def _want_fork(self) -> None:
        """Fork job processes ahead until FORK_DEPTH wait, each in a cgroup of its own;
        then the zygote moves on into an empty one (no job's cgroup holds it: one may be
        swept any time)."""
        try:
            while self._waiting() < FORK_DEPTH and not self.broken:
                if not self._fresh():
                    self._move()
                self._fork()
            self._move()
        except (OSError, CgroupUnavailable):
            self.broken = True

    def prepare(self) -> None:
        """After the ready message: fork the first job processes, each in a job cgroup."""
        self._want_fork()

    def after_job(self, cgroup: JobCgroup, cleanup: Callable[[], None] | None) -> None:
        """The job in ``cgroup`` ended: ``cleanup`` (its leftovers) in a thread once the
        zygote is out of its cgroup; the next job may start meanwhile."""
        self._want_fork()
        self._begin_step(cgroup, cleanup)

    async def settle(self) -> None:
        """Wait for every thread step started so far (a job's cgroup may then be swept:
        the zygote is out of it)."""
        while self._pending:
            done, _ = await asyncio.wait(list(self._pending))
            if any(not f.cancelled() and f.exception() is not None for f in done):
                self.broken = True

    async def take_cgroup(self) -> JobCgroup:
        """The cgroup the next job runs in (its process is already there, waiting)."""
        # a backlog of clean-ups (slower than the jobs: a namespace's teardown can take
        # ms), so that they cannot pile up
        while self._cleaning > MAX_CLEANUPS_BEHIND and self._pending and not self.broken:
            await asyncio.wait(list(self._pending), return_when=asyncio.FIRST_COMPLETED)
        return (await self.forked_ahead()).cgroup

    async def forked_ahead(self) -> JobProc:
        """The job process forked for the next job (asked for now if it was not; its W
        may still come). Raises WarmError."""
        if self.ahead is None:
            self._want_fork()
        if self.ahead is None or self.broken:
            self.broken = True
            raise WarmError("no job process forked ahead")
        return self.ahead

    async def start_job(self, req: JobRequest, fds: list[int], cgroup: JobCgroup, *,
                        fork_ahead: bool = True) -> None:
        """Hand the waiting job process its job and fds (once it is sure to be in
        ``cgroup``); with ``fork_ahead``, the zygote forks the next job's process while
        this job runs."""
        self.job_sent = False
        jp = self.forked.popleft() if self.forked else None
        try:
            if jp is None:
                raise WarmError("no job process forked ahead")
            self.current = jp
            if cgroup is not jp.cgroup:
                raise WarmError("the job process is not in its job cgroup")
            await asyncio.shield(jp.check())  # made ahead (warm_prepare.py), or now
            self.job_pidfd, jp.pidfd = jp.pidfd, None  # from here on, this very process
            payload = launcher.encode(req) if self.native else b"J" + json.dumps(req.__dict__).encode()
            jp.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                         array.array("i", fds))])
            self.job_sent = True
            if fork_ahead:
                self._want_fork()
        except (OSError, WarmError):
            self.broken = True
            raise

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

    async def wait_job(self) -> int:
        """The job's end, as asyncio reports a returncode (-N for signal N). Raises
        WarmError when the setup failed before the job's code ran."""
        jp = self.current
        assert jp is not None
        setup_error = mount_error = ""
        try:
            while True:  # its socket closes as the job's own code starts (or the process ends)
                msg, _ = await jp.next()
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
            self._ended_ns += jp.take_ns()
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
        held, self._ended_ns = self._ended_ns, []
        for fd in held:
            os.close(fd)
        for left in self._moved:  # a step waiting for one ends (its clean-up is close()'s)
            if not left.done():
                left.set_exception(WarmError("the warm interpreter was closed"))
                left.exception()
        self._moved.clear()
        self._left.clear()
        waiting_cgs = [jp.cgroup for jp in self.forked]
        for jp in (*self.forked, self.current):
            if jp is not None:
                jp.close()
        self.forked.clear()
        self.current = None
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
        for cg in {id(c): c for c in (self.zcg, *waiting_cgs, self.home, *spare) if c is not None}.values():
            cg.kill_all(timeout=0.5)
            cg.remove()
        self.zcg = None
        shutil.rmtree(self.dir, ignore_errors=True)
