"""Spawn one job process and watch it: output caps, wall deadline, CPU budget, sweep.

Shared by the process and nsjail backends (nsjail is just a different argv and a
different preexec) and by warm runs (``supervise_launch`` with a fork from a warm
interpreter). The job's first process joins the job cgroup before it runs the job, so
every descendant is counted and swept; without a cgroup we fall back to the process
group.
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from .base import OutputCallback
from .cgroups import JobCgroup
from .output import CappedStream, drain, open_pipe
from .spec import Limits, Outcome, Status

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


@dataclass
class Launched:
    """A started job: ``wait`` resolves to its returncode (-N for signal N); ``pgid`` is
    its process group to kill, when it has one of its own; ``kill``, when given, is how
    to kill the job before it ended instead of the cgroup; ``sweep`` False when the
    job's end already is the end of all its processes, so its cgroup is not swept here
    (a warm job: pid 1 of its pid namespace, whose cgroup may still hold the warm
    interpreter and the job's parent for a moment; they clean up after)."""

    wait: Awaitable[int]
    pgid: int | None
    kill: Callable[[], None] | None = None
    sweep: bool = True


# Starts the job with (stdin fd or None for /dev/null, stdout write end, stderr write
# end); the caller closes its copies of the fds once this returns.
Launch = Callable[[int | None, int, int], Awaitable[Launched]]


async def supervise(argv: list[str], *, env: dict[str, str], cwd: str, stdin: bytes,
                    limits: Limits, cgroup: JobCgroup | None,
                    preexec: Callable[[], None] | None,
                    on_output: OutputCallback | None,
                    extra_wall_s: float = 0.0) -> Supervised:
    """Run ``argv`` to completion under ``limits`` (wall, CPU via the cgroup, output caps).

    Cancellation kills the whole job (cgroup and process group) before re-raising.
    ``extra_wall_s`` gives a wrapper (nsjail) time to enforce its own limit first.
    """

    async def launch(in_fd: int | None, out_w: int, err_w: int) -> Launched:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=in_fd if in_fd is not None else asyncio.subprocess.DEVNULL,
            stdout=out_w, stderr=err_w, cwd=cwd, env=env, close_fds=True,
            start_new_session=True, preexec_fn=preexec,
        )
        return Launched(wait=proc.wait(), pgid=proc.pid)

    return await supervise_launch(launch, stdin=stdin, limits=limits, cgroup=cgroup,
                                  on_output=on_output, extra_wall_s=extra_wall_s)


async def supervise_launch(launch: Launch, *, stdin: bytes, limits: Limits,
                           cgroup: JobCgroup | None, on_output: OutputCallback | None,
                           extra_wall_s: float = 0.0) -> Supervised:
    """``supervise`` for any way of starting the job (exec, or a warm fork)."""
    res = Supervised()
    out_r, out_w = open_pipe()
    err_r, err_w = open_pipe()
    in_fd = stdin_fd(stdin)
    job: Launched | None = None
    waiting = False  # this task awaits the job's end (job.wait)
    streams: list[CappedStream] = []
    t0 = time.monotonic()

    def kill_now() -> None:
        if job is not None and job.kill is not None:
            job.kill()
            return
        if job is not None and job.pgid is not None:
            _kill_group(job.pgid)
        if cgroup is not None:
            cgroup.kill_all(timeout=0.0)  # first volley now; the sweep finishes the job

    def trip(reason: str) -> None:
        """End the job for ``reason`` (the first one counts): it is killed, which ends the
        wait for it."""
        if res.killed_for is None:
            res.killed_for = reason
        kill_now()

    def deadline(reason: str) -> None:  # a timer's: only while the job runs
        if waiting:
            trip(reason)

    try:
        try:
            job = await launch(in_fd, out_w, err_w)
        finally:
            for fd in (out_w, err_w, in_fd):
                if fd is not None:
                    os.close(fd)
        streams = [
            CappedStream("stdout", out_r, limits.output_bytes, on_output, lambda: trip(KILL_OUTPUT)),
            CappedStream("stderr", err_r, limits.output_bytes, on_output, lambda: trip(KILL_OUTPUT)),
        ]
        out_r = err_r = -1
        # The job's end is awaited in this task, no waiter task and no future between
        # them (each a loop turn per job, docs/performance.md, "Round 3"): the wall
        # deadline, an output overflow and the CPU watch (timers, not tasks) kill the job,
        # which ends the wait promptly (its group and cgroup got SIGKILL).
        loop = asyncio.get_running_loop()
        timers = [loop.call_later(limits.wall_s + extra_wall_s, deadline, KILL_TIMEOUT)]
        if limits.cpu_s is not None and cgroup is not None and cgroup.cpu_ns() is not None:
            _cpu_watch(cgroup, limits.cpu_s, deadline, timers)
        waiting = True
        try:
            res.returncode = await job.wait
        finally:
            waiting = False
            for t in timers:
                t.cancel()
        res.wall_ms = int((time.monotonic() - t0) * 1000)
        # Sweep: whatever the job left behind dies now, so the pipes reach EOF.
        sweep = cgroup is not None and job.sweep
        if sweep and not cgroup.kill_all(timeout=0.0):
            await asyncio.to_thread(cgroup.kill_all)  # stragglers (fork bomb): off-loop
        if job.pgid is not None:
            _kill_group(job.pgid)
        await drain(streams, grace=0.2 if cgroup is not None else 0.05)
        if cgroup is not None:
            res.survivors = len(cgroup.pids()) if sweep else 0
            res.oom_kills = cgroup.oom_kills()
            res.peak_memory_kb = cgroup.peak_memory_bytes() // 1024
            ns = cgroup.cpu_ns()
            if ns is not None:
                res.cpu_ms = ns // 1_000_000
    except BaseException:
        # Cancelled (or a bug): kill everything synchronously before propagating.
        if job is not None and hasattr(job.wait, "close"):
            job.wait.close()  # a coroutine never awaited (or ended): no warning, no leak
        if job is not None and job.kill is not None:
            job.kill()
        if job is not None and job.pgid is not None:
            _kill_group(job.pgid)
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


def _cpu_watch(cgroup: JobCgroup, cpu_s: float, trip: Callable[[str], None],
               timers: list[asyncio.TimerHandle]) -> None:
    """Kill the job once the whole cgroup (children included) used ``cpu_s`` of CPU:
    RLIMIT_CPU alone is per process, a job could fork around it. A read every
    CPU_POLL_S by a timer (its handle kept in one item of ``timers``, which the job's end
    cancels)."""
    budget = int(cpu_s * 1e9)
    loop = asyncio.get_running_loop()

    def poll() -> None:
        used = cgroup.cpu_ns()
        if used is not None and used >= budget:
            trip(KILL_CPU)
        else:
            timers[slot] = loop.call_later(CPU_POLL_S, poll)  # one handle, however long it runs

    slot = len(timers)
    timers.append(loop.call_later(CPU_POLL_S, poll))


def cpu_rlimit(cpu_s: float) -> tuple[int, int]:
    """(soft, hard) RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL one second later."""
    soft = max(1, math.ceil(cpu_s))
    return soft, soft + 1


def job_rlimits(limits: Limits) -> list[tuple[int, tuple[int, int]]]:
    """The rlimits every job process gets: CPU, file size, open files, no core dumps."""
    rl: list[tuple[int, tuple[int, int]]] = []
    if limits.cpu_s is not None:
        rl.append((resource.RLIMIT_CPU, cpu_rlimit(limits.cpu_s)))
    if limits.file_size_mb is not None:
        n = limits.file_size_mb * 1024 * 1024
        rl.append((resource.RLIMIT_FSIZE, (n, n)))
    if limits.open_files is not None:
        rl.append((resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files)))
    rl.append((resource.RLIMIT_CORE, (0, 0)))
    return rl


def classify(sup: Supervised, limits: Limits, files: dict[str, bytes], detail: str = "") -> Outcome:
    """Turn supervisor facts into an Outcome. Order matters: what the supervisor killed
    for wins, then the kernel's verdicts (OOM, CPU signals), then the job's own end."""
    rc = sup.returncode
    sig_no = -rc if rc is not None and rc < 0 else None
    sig_name = _signame(sig_no) if sig_no else None
    cpu_hit = (limits.cpu_s is not None and sig_no in (signal.SIGXCPU, signal.SIGKILL)
               and sup.cpu_ms >= limits.cpu_s * 1000 * 0.9)
    if sup.killed_for == KILL_OUTPUT:
        status = Status.output_limit
    elif sup.killed_for == KILL_TIMEOUT:
        status = Status.timeout
    elif sup.killed_for == KILL_CPU or sig_no == signal.SIGXCPU or cpu_hit:
        status = Status.cpu_limit
    elif sup.oom_kills > 0:
        status = Status.memory_limit
    elif sig_no:
        status = Status.signalled
    elif rc:
        status = Status.exit_nonzero
    else:
        status = Status.success
    notes = list(sup.notes)
    if sup.survivors:
        notes.append(f"{sup.survivors} process(es) survived the sweep")
    if detail:
        notes.insert(0, detail)
    return Outcome(
        status=status, exit_code=rc if rc is not None and rc >= 0 else None, signal=sig_name,
        wall_ms=sup.wall_ms, cpu_ms=sup.cpu_ms, peak_memory_kb=sup.peak_memory_kb,
        stdout=sup.stdout, stderr=sup.stderr, stdout_truncated=sup.stdout_truncated,
        stderr_truncated=sup.stderr_truncated, files=files, detail="; ".join(notes),
    )


def _signame(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"SIG{n}"
