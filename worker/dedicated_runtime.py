"""The worker's side of one dedicated runtime: a long-lived python3 process that runs the
jobs of one script, inside the group's sandbox (templates/dedicated_runtime.py is the
other side).

The runtime is started as a warm job process of the backend's warm pool
(isolation/warm.py, zygote.py): the same sandbox, uid, namespaces (no network), rlimits
and a job cgroup with the group's memory, pids and CPU limits, now held by the runtime
for its whole life. Jobs are sent ahead over a unix stream socket (its fd 0); each job
gets a pipe of its own for its stdout and stderr; results come back on the socket,
tagged with the job id, after a start message (``S``) for each job, so the worker knows
exactly which job was running when the runtime died: only that one fails, the ones sent
behind it never started and go to the next runtime.
"""

from __future__ import annotations

import asyncio
import functools
import os
import resource
import signal
import socket
from pathlib import Path
from typing import Callable

from sandmill.isolation import Limits, Outcome, Status, workdir
from sandmill.isolation.cgroups import CgroupUnavailable, JobCgroup
from sandmill.isolation.supervise import job_rlimits
from sandmill.isolation.warm import JobRequest, WarmError, WarmPool, Zygote

from .dedicated_channel import Channel, ResultFn, Sent
from .runtimes import template

RUNTIME_NAME = "dedicated_runtime.py"
RUNTIME_SOURCE = template(RUNTIME_NAME)
START_TIMEOUT_S = 15.0


class RuntimeStartError(RuntimeError):
    """The runtime could not be started (the warm pool is off, the sandbox failed)."""


class Runtime(Channel):
    """One runtime process. ``send`` queues a job; ``on_result`` is called for each job's
    result in order; ``ended`` resolves with the reason the process ended (its own
    ``kill(why)`` or the kernel's verdict), when the owner re-sends what never started."""

    def __init__(self, pool: WarmPool, python: str, limits: Limits, env: dict[str, str],
                 on_result: ResultFn, output_cap: int, on_change: Callable[[], None]) -> None:
        self.pool = pool
        self.python = python
        self.limits = limits
        self.env = env
        self.on_result = on_result
        self.on_change = on_change  # something happened (a result, the end): wake the owner
        self.output_cap = output_cap  # bytes of a job's output kept
        self._init_channel()
        self.why = ""  # our reason for killing it
        self.ended: asyncio.Future[tuple[Status, str]] | None = None
        self.z: Zygote | None = None
        self.sock: socket.socket | None = None
        self._cgroup: JobCgroup | None = None
        self._wd: Path | None = None
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self.own_output = b""
        self.on_start: Callable[[Sent], None] | None = None  # a job's S came

    # ---- start and end -------------------------------------------------------------------

    async def start(self) -> None:
        """Start the process in the sandbox and wait for its ready message."""
        pool, lim = self.pool, self.limits
        if pool.disabled:
            raise RuntimeStartError(f"warm interpreters are off on this backend: {pool.disabled}")
        try:
            z = self.z = await pool.acquire(self.python, RUNTIME_NAME, RUNTIME_SOURCE)
        except WarmError as e:
            raise RuntimeStartError(str(e)) from None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self._wd = workdir.create(z.dir, {RUNTIME_NAME: RUNTIME_SOURCE}, pool.uid, pool.gid)
            self._cgroup = await z.take_cgroup()
            self._cgroup.set_limits(lim.memory_bytes, lim.pids, lim.cpu_cores)
            mount = pool.mount_at or str(z.dir)
            # no RLIMIT_CPU: it would count the runtime's whole life, not one job
            rl = [(r, s, h) for r, (s, h) in job_rlimits(lim) if r != resource.RLIMIT_CPU]
            req = JobRequest(dir=f"{mount}/{self._wd.name}", mount=mount, argv=[RUNTIME_NAME],
                             env=dict(self.env), rlimits=rl, tmp_bytes=lim.tmp_bytes,
                             hostname=pool.hostname)
            await z.start_job(req, [theirs.fileno(), out_w, out_w], self._cgroup,
                              fork_ahead=False)  # it runs for long: no process waits beside it
        except (OSError, WarmError, CgroupUnavailable, ValueError, workdir.BadSpec) as e:
            z.broken = True
            ours.close()
            os.close(out_r)
            await self._cleanup()
            raise RuntimeStartError(f"cannot start the runtime: {type(e).__name__}: {e}") from None
        finally:
            theirs.close()
            os.close(out_w)
        self._own_out = out_r  # the runtime's output outside jobs: read and dropped
        self._loop.add_reader(out_r, self._drop_output)
        ours.setblocking(False)
        self.sock = ours
        self._loop.add_reader(ours.fileno(), self._readable)
        self.ended = asyncio.ensure_future(self._watch_end())
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_TIMEOUT_S)
        except (asyncio.TimeoutError, RuntimeStartError):
            self.kill("start")
            await asyncio.shield(self.ended)
            said = self.own_output.decode(errors="replace").strip()[-2000:]
            raise RuntimeStartError("the runtime did not start (no ready message)"
                                    + (f"; it wrote: {said}" if said else "")) from None

    async def _watch_end(self) -> tuple[Status, str]:
        assert self.z is not None
        try:
            rc = await self.z.wait_job()
        except (WarmError, OSError) as e:
            rc = None
            detail = str(e)
        else:
            detail = ""
        self._last_rc = rc
        status = self._verdict(rc)
        await self._close_io()
        if not self._ready.done():
            self._ready.set_exception(RuntimeStartError(detail or f"runtime ended ({status.value})"))
            self._ready.exception()  # retrieved: start() reports it
        await self._cleanup()
        self.on_change()
        return status, detail or (f"exit code {rc}" if rc is not None else "")

    def _verdict(self, rc: int | None) -> Status:
        if self.why == "timeout":
            return Status.timeout
        if self.why == "output":
            return Status.output_limit
        if self._cgroup is not None and self._cgroup.oom_kills() > 0:
            return Status.memory_limit
        if rc is not None and rc < 0:
            return Status.signalled
        if rc:
            return Status.exit_nonzero
        return Status.success  # exit 0 (sys.exit(0) in a job): still no result

    def describe(self, status: Status, rc_detail: str, limits: Limits) -> tuple[str, str]:
        """(error name, message) of the job that was running when the runtime ended."""
        names = {Status.timeout: "Timeout", Status.output_limit: "OutputLimit",
                 Status.memory_limit: "MemoryLimit", Status.signalled: "Signalled",
                 Status.exit_nonzero: "ExitCode", Status.success: "ExitCode"}
        if self.why == "canceled":
            return "Canceled", "job canceled"
        if self.why == "protocol":
            return "ProtocolViolation", ("the runtime sent a frame that was not the running job's (the"
                                         " job wrote to the runtime's control channel); the runtime was replaced")
        out = Outcome(status)
        if status is Status.signalled and self._last_rc is not None:
            try:
                out.signal = signal.Signals(-self._last_rc).name
            except ValueError:
                out.signal = f"SIG{-self._last_rc}"
        if status in (Status.exit_nonzero, Status.success):
            out.exit_code = self._last_rc
            return names[status], f"the job ended the runtime: exited with code {out.exit_code}"
        return names.get(status, "Error"), out.describe(limits) + " (the runtime was replaced)"

    _last_rc: int | None = None

    def kill(self, why: str) -> None:
        """SIGKILL the runtime (its pid namespace goes with it); ``ended`` resolves."""
        if not self.why:
            self.why = why
        if self.z is not None:
            self.z.kill_job()

    async def _close_io(self) -> None:
        loop = self._loop
        if self.sock is not None:
            try:
                self._readable()  # what it sent before it ended
            except Exception:  # noqa: BLE001
                pass
            loop.remove_reader(self.sock.fileno())
            loop.remove_writer(self.sock.fileno())
            self.sock.close()
            self.sock = None
        if getattr(self, "_own_out", None) is not None:
            loop.remove_reader(self._own_out)
            os.close(self._own_out)
            self._own_out = None
        for s in self.inflight:
            self._stop_reading(s)
            if s.timer is not None:
                s.timer.cancel()

    async def _cleanup(self) -> None:
        z, cg, wd = self.z, self._cgroup, self._wd
        self._cgroup = self._wd = None
        if z is None:
            return
        if not z.broken and cg is not None:
            z.after_job(cg, functools.partial(_remove, cg, wd))  # once the zygote is out of it
        else:
            await z.settle()
            if cg is not None:
                await asyncio.to_thread(_remove, cg, wd)
            elif wd is not None:
                workdir.remove(wd)
        self.pool.release(z)

    def _drop_output(self) -> None:
        """The runtime's own output (outside jobs): its last 4 KiB are kept for errors."""
        fd = self._own_out
        try:
            while chunk := os.read(fd, 65536):
                self.own_output = (self.own_output + chunk)[-4096:]
        except (BlockingIOError, OSError, TypeError):
            return
        # EOF: the runtime gave its fds 1 and 2 to its first job. A reader left on a pipe at
        # EOF is readable for good: the worker spun a core on it (issue 18's latency)
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)
            self._own_out = None

    def peak_memory_kb(self) -> int:
        """The runtime's memory high-water mark (its cgroup's), in KiB."""
        try:
            return self._cgroup.peak_memory_bytes() // 1024 if self._cgroup is not None else 0
        except OSError:
            return 0


def _remove(cg: JobCgroup, wd: Path | None) -> None:
    cg.kill_all()
    cg.remove()
    if wd is not None:
        workdir.remove(wd)


