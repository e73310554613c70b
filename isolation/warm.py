"""Warm Python: run python3 jobs by fork from a pre-started interpreter, not by exec.

A fork of a warm interpreter is far cheaper than a fresh interpreter's start (figures in
docs/performance.md, "Warm zygote"). The warm interpreter (``zygote.py``) runs inside
the same sandbox a cold job gets (the backend starts it: nsjail, or the process
backend's namespaces), and each job is a fork of it that goes on into fresh user, mount,
pid, ipc and uts namespaces of its own (the network namespace is the zygote's: empty,
loopback down, not the job's to change), with its own work dir, /tmp, /proc and job
cgroup (the zygote sits in that cgroup when it forks the job process, ahead of the
job, while the job before it runs: ``warm_zygote.Zygote``), and no capabilities.

This module is the worker's side: a pool of zygotes per interpreter (one per job
running at once; each a ``warm_zygote.Zygote``, which speaks the socket protocol of
zygote.py), and a ``launch`` for
``supervise.supervise_launch`` so that output caps, deadlines and the sweep are the
same code as for a cold job.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

from . import workdir
from .base import OutputCallback, Prepared
from .cgroups import CgroupUnavailable, JobCgroup
from .spec import Outcome, RunSpec, Status
from .supervise import Launched, classify, job_rlimits, supervise_launch
from .warm_mounts import existing_dirs, warm_mounts_problem
from .warm_prepare import WarmPrepared, job_started, lane_done
from .warm_pool import BASH, DEFAULT_PRELOAD, NATIVE, PYTHON_FLAGS, START_TIMEOUT_S, WarmPool
from .warm_zygote import JobRequest, WarmError, WarmMountError, WarmSetupError, Zygote

__all__ = ["BASH", "DEFAULT_PRELOAD", "NATIVE", "START_TIMEOUT_S", "JobRequest", "WarmError", "WarmMountError", "WarmPool",
           "WarmSetupError", "Zygote", "existing_dirs", "prepare_warm", "run_warm", "warm_mounts_problem",
           "warm_script"]

log = logging.getLogger(__name__)

# a zygote's emptied job cgroups serve its later jobs (JobCgroup.recycle); the
# environment's 0 turns it off, for the benchmark's before/after
RECYCLE_CGROUPS = os.environ.get("SANDMILL_RECYCLE_CGROUPS", "1") != "0"


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


def make_launch(z: Zygote, req: JobRequest, cgroup: JobCgroup,
                sent: Callable[[], None] | None = None):
    """A ``supervise_launch`` launcher that runs ``req`` in ``z``; ``sent`` is called
    once the job has gone."""

    async def launch(stdin_fd: int | None, out_w: int, err_w: int) -> Launched:
        null = os.open(os.devnull, os.O_RDONLY) if stdin_fd is None else None
        try:
            await z.start_job(req, [stdin_fd if null is None else null, out_w, err_w], cgroup)
        finally:
            if null is not None:
                os.close(null)
        if sent is not None:
            sent()
        return Launched(wait=z.wait_job(), pgid=None, kill=z.kill_job, sweep=False)

    return launch


def _plan(pool: WarmPool, spec: RunSpec, program: str,
          can_exec: bool) -> tuple[str | None, list[str] | None] | None:
    """How ``spec`` runs warm: (its runtime script, run in-process, or None; the argv to
    exec, or None); None when it cannot (run_warm's arguments)."""
    if pool.disabled or spec.network != "none" or not spec.argv:
        return None
    script = warm_script(spec)
    if script is not None:
        return script, None
    if can_exec and os.path.isabs(program) and os.access(program, os.X_OK):
        return None, [program, *spec.argv[1:]]
    return None


@functools.lru_cache(maxsize=64)
def _is_bash(program: str) -> bool:
    return os.path.basename(os.path.realpath(program)) == "bash"  # /bin/bash -> /usr/bin/bash


async def _exec_zygote(pool: WarmPool, spec: RunSpec, argv: list[str]) -> str:
    """The zygote kind that execs ``argv``: a warm bash for a bash script (bash_zygote.c
    runs it in the clone, or execs it when its environment is one bash reads at start), else
    the native exec zygote; the Python one for a job with mounts of its own."""
    if spec.mounts or await pool.native() is None:
        return pool.python
    if (len(argv) > 1 and argv[1][:1] not in ("-", "+")  # a script, no option first
            and _is_bash(argv[0]) and await pool.warm_bash(argv[0])):
        return BASH + argv[0]
    return NATIVE


def prepare_warm(pool: WarmPool, spec: RunSpec, lane: object, program: str,
                 can_exec: bool = True) -> WarmPrepared | None:
    """``spec``'s warm set-up, started while ``lane``'s job runs (warm_prepare.py), for
    ``run_warm(..., prepared=)`` with the same arguments; None when it would not run warm."""
    if (plan := _plan(pool, spec, program, can_exec)) is None:
        return None
    script, exec_argv = plan
    p = WarmPrepared(pool, spec, lane, script, program,
                     functools.partial(_request, pool, spec, script, exec_argv))
    p.start()
    return p


def _request(pool: WarmPool, spec: RunSpec, script: str | None, exec_argv: list[str] | None,
             z: Zygote, wd: Path) -> JobRequest:
    """The job's message to its job process in ``z``, its work dir ``wd``."""
    limits = spec.limits
    mount = pool.mount_at or str(z.dir)
    return JobRequest(
        dir=f"{mount}/{wd.name}", mount=mount,
        argv=spec.argv[spec.argv.index(script, 1):] if script else [], env=dict(spec.env),
        rlimits=[(r, s, h) for r, (s, h) in job_rlimits(limits)],
        tmp_bytes=limits.tmp_bytes,
        hostname=pool.hostname, exec=exec_argv,
        mounts=[[m.source, m.target] for m in spec.mounts])


async def run_warm(pool: WarmPool, spec: RunSpec, on_output: OutputCallback | None,
                   program: str, can_exec: bool = True,
                   prepared: Prepared | None = None) -> Outcome | None:
    """Run ``spec`` warm; None when it must run cold instead (network on, pool off, or
    the warm path failed before any of the job's code ran, e.g. a mount the job process
    could not make). The backend has checked ``spec.mounts`` (``warm_mounts_problem``). ``program`` is argv[0]
    resolved to a path. A spec with a runtime script (``spec.warm``) runs in-process in a
    warm ``program``; any other is exec'd by a forked job process (``can_exec``: the
    backend says ``program`` is visible in the sandbox), which still skips the sandbox
    set-up and the cgroup move. ``prepared``: its set-up made by ``prepare_warm`` while
    the job before ran, taken when it fits (else discarded)."""
    if (plan := _plan(pool, spec, program, can_exec)) is None:
        return None
    script, exec_argv = plan
    if script is not None:
        key: tuple[str, str, bytes] = (program, script, spec.files[script])
    else:
        key = (await _exec_zygote(pool, spec, exec_argv or []), "", b"")
    limits = spec.limits
    lane = asyncio.current_task()
    ready = await prepared.take(spec, (key[0], key[2])) if isinstance(prepared, WarmPrepared) else None
    if ready is not None:
        z = ready.z  # kept for this job since the job before it ended
    else:
        try:
            z = await pool.acquire(*key)
        except WarmError:
            return None
    wd: Path | None = None
    cgroup: JobCgroup | None = None
    try:
        if ready is not None:
            wd, req = ready.wd, ready.req  # made while the job before ran
        else:
            try:
                wd = workdir.create(z.dir, spec.files, pool.uid, pool.gid)
            except (OSError, workdir.BadSpec) as e:
                return Outcome(Status.sandbox_error, detail=f"work dir: {e}")
            req = _request(pool, spec, script, exec_argv, z, wd)
        try:
            cgroup = await z.take_cgroup()
            # The zygote may still be in the cgroup for a moment, when its steps fall
            # behind: a job may then have one process less than its limit, never more.
            if ready is None:
                cgroup.set_limits(limits.memory_bytes, limits.pids, limits.cpu_cores)
        except (WarmError, OSError) as e:
            z.broken = True
            return Outcome(Status.sandbox_error, detail=f"cgroup: {e}")
        try:
            launch = make_launch(z, req, cgroup, functools.partial(job_started, pool, lane, z))
            sup = await supervise_launch(launch, stdin=spec.stdin, limits=limits, cgroup=cgroup,
                                         on_output=on_output)
        except WarmSetupError as e:
            # e.g. no unprivileged user namespaces on this kernel (the native one: itself only)
            pool.kind_off(z.key[0], str(e))
            return None
        except WarmMountError as e:  # this job's mounts only; the zygote goes on
            log.info("a job's mounts cannot be made warm, running it cold: %s", e)
            return None
        except (WarmError, OSError) as e:  # this zygote only: the next job gets a new one
            z.broken = True
            if z.job_sent:  # the sandbox died under the job, whose code may have run: never twice
                return Outcome(Status.sandbox_error, detail=f"the warm sandbox died during the job: {e}")
            log.warning("warm run failed before the job started, running it cold: %s", e)
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
            # After the result, in a thread while the next job of this zygote may already
            # run: the cgroup and work dir go, and the zygote moves on.
            z.after_job(cgroup, functools.partial(_remove, z, cgroup, wd))
            cgroup = wd = None
        if cgroup is not None:
            if not z.broken:  # never sweep the zygote along with the job
                try:
                    await z.out_of(cgroup)
                except (OSError, WarmError, CgroupUnavailable):
                    z.broken = True
            cgroup.kill_all()
            cgroup.remove()
        if wd is not None:
            workdir.remove(wd)
        lane_done(pool, lane, z)
        pool.release(z)


def _remove(z: Zygote, cgroup: JobCgroup, wd: Path) -> None:
    """(In a thread.) The job's leftovers go; its cgroup, emptied, serves a later job of
    the same zygote when it can be reset (JobCgroup.recycle), else it is removed."""
    emptied = cgroup.kill_all()
    workdir.remove(wd)  # first: its files' pages are then uncharged before the reset
    if emptied and RECYCLE_CGROUPS and not z.broken and cgroup.recycle(emptied=True):
        z.spare.append(cgroup)
        if not z.broken:
            return
        try:  # closed meanwhile: close() may have missed it
            z.spare.remove(cgroup)
        except ValueError:
            return  # close() took it
    cgroup.remove()
