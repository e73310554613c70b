"""Spawn one job process and watch it: output caps, wall deadline, CPU budget, sweep.

Shared by the process and nsjail backends (nsjail is just a different argv and a
different preexec). The job's first process joins the job cgroup before exec, so every
descendant is counted and swept; without a cgroup we fall back to the process group.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .base import OutputCallback
from .cgroups import JobCgroup
from .output import CappedStream, drain, open_pipe
from .spec import Limits

# Why the supervisor itself ended the job (None: it ended on its own).
KILL_TIMEOUT = "timeout"
KILL_CPU = "cpu_limit"
KILL_OUTPUT = "output_limit"

CPU_POLL_S = 0.05


@dataclass
class Supervised:
    """Raw facts about one run; the backend turns them into an Outcome."""

    returncode: int | None = None  # as asyncio reports it: -N for signal N
    killed_for: str | None = None
    wall_ms: int = 0
    cpu_ms: int = 0
    peak_memory_kb: int = 0
    oom_kills: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    survivors: int = 0  # processes still alive after the sweep (should be 0)
    notes: list[str] = field(default_factory=list)


def stdin_fd(data: bytes) -> int | None:
    """An fd the job reads ``data`` from then EOF (a memfd: no writer task, no blocking);
    None means /dev/null."""
    if not data:
        return None
    fd = os.memfd_create("sandmill-stdin", os.MFD_CLOEXEC)
    os.write(fd, data) if len(data) < (1 << 16) else _write_all(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _kill_group(pgid: int) -> None:
    # Safe even after the leader is reaped: Linux never reuses a pid that is still
    # some live process's pgid.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


async def supervise(argv: list[str], *, env: dict[str, str], cwd: str, stdin: bytes,
                    limits: Limits, cgroup: JobCgroup | None,
                    preexec: Callable[[], None] | None,
                    on_output: OutputCallback | None,
                    extra_wall_s: float = 0.0) -> Supervised:
    """Run ``argv`` to completion under ``limits`` (wall, CPU via the cgroup, output caps).

    Cancellation kills the whole job (cgroup and process group) before re-raising.
    ``extra_wall_s`` gives a wrapper (nsjail) time to enforce its own limit first.
    """
    res = Supervised()
    out_r, out_w = open_pipe()
    err_r, err_w = open_pipe()
    in_fd = stdin_fd(stdin)
    loop = asyncio.get_running_loop()
    tripped = asyncio.Event()
    proc: asyncio.subprocess.Process | None = None
    streams: list[CappedStream] = []
    t0 = time.monotonic()

    def kill_now() -> None:
        if proc is not None:
            _kill_group(proc.pid)
        if cgroup is not None:
            cgroup.kill_all(timeout=0.0)  # first volley now; the sweep finishes the job

    def trip(reason: str) -> None:
        if res.killed_for is None:
            res.killed_for = reason
        kill_now()
        tripped.set()

    try:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=in_fd if in_fd is not None else asyncio.subprocess.DEVNULL,
                stdout=out_w, stderr=err_w, cwd=cwd, env=env, close_fds=True,
                start_new_session=True, preexec_fn=preexec,
            )
        finally:
            for fd in (out_w, err_w, in_fd):
                if fd is not None:
                    os.close(fd)
        streams = [
            CappedStream("stdout", out_r, limits.output_bytes, on_output, lambda: trip(KILL_OUTPUT)),
            CappedStream("stderr", err_r, limits.output_bytes, on_output, lambda: trip(KILL_OUTPUT)),
        ]
        out_r = err_r = -1
        waiter = asyncio.ensure_future(proc.wait())
        tripper = asyncio.ensure_future(tripped.wait())
        watchers = [waiter, tripper]
        if limits.cpu_s is not None and cgroup is not None and cgroup.cpu_ns() is not None:
            watchers.append(asyncio.ensure_future(_cpu_watch(cgroup, limits.cpu_s, trip)))
        try:
            await asyncio.wait(watchers, timeout=limits.wall_s + extra_wall_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in watchers[1:]:
                w.cancel()
        if not waiter.done():
            if not tripped.is_set():
                trip(KILL_TIMEOUT)
            await waiter  # the group and cgroup got SIGKILL: this is prompt
        res.returncode = proc.returncode
        res.wall_ms = int((time.monotonic() - t0) * 1000)
        # Sweep: whatever the job left behind dies now, so the pipes reach EOF.
        if cgroup is not None and not cgroup.kill_all(timeout=0.0):
            await asyncio.to_thread(cgroup.kill_all)  # stragglers (fork bomb): off-loop
        _kill_group(proc.pid)
        await drain(streams, grace=0.2 if cgroup is not None else 0.05)
        if cgroup is not None:
            res.survivors = len(cgroup.pids())
            res.oom_kills = cgroup.oom_kills()
            res.peak_memory_kb = cgroup.peak_memory_bytes() // 1024
            ns = cgroup.cpu_ns()
            if ns is not None:
                res.cpu_ms = ns // 1_000_000
    except BaseException:
        # Cancelled (or a bug): kill everything synchronously before propagating.
        if proc is not None:
            _kill_group(proc.pid)
        if cgroup is not None:
            cgroup.kill_all()
        for s in streams:
            s.close()
        raise
    finally:
        for fd in (out_r, err_r):
            if fd >= 0:
                os.close(fd)
    out, err = streams
    res.stdout, res.stderr = bytes(out.buf), bytes(err.buf)
    res.stdout_truncated, res.stderr_truncated = out.truncated, err.truncated
    return res


async def _cpu_watch(cgroup: JobCgroup, cpu_s: float, trip: Callable[[str], None]) -> None:
    """Kill the job once the whole cgroup (children included) used ``cpu_s`` of CPU:
    RLIMIT_CPU alone is per process, a job could fork around it."""
    budget = int(cpu_s * 1e9)
    while True:
        await asyncio.sleep(CPU_POLL_S)
        used = cgroup.cpu_ns()
        if used is not None and used >= budget:
            trip(KILL_CPU)
            return


def cpu_rlimit(cpu_s: float) -> tuple[int, int]:
    """(soft, hard) RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL one second later."""
    soft = max(1, math.ceil(cpu_s))
    return soft, soft + 1
