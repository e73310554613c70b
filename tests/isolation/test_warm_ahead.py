"""The next job process is forked ahead, while a job runs (isolation/zygote.py's F and
each job process's own socket): what that must keep of one job at a time."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import psutil
import pytest
from test_conformance import explain, spec
from test_warm import _usable

from sandmill.isolation import Status
from sandmill.isolation.nsjail import NsjailBackend
from sandmill.isolation.process import ProcessBackend
from sandmill.isolation.warm_zygote import FORK_DEPTH, MAX_CLEANUPS_BEHIND

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["process", "nsjail"])
def warm(request):
    b = _usable(ProcessBackend if request.param == "process" else NsjailBackend)
    yield b
    b.close()


def _zygote(b) -> psutil.Process:
    [z] = [z for zs in b.warm_pool.idle.values() for z in zs]
    return psutil.Process(z.pid)


def _cgroup(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return "".join(sorted(line for line in f if ":memory:" in line or line.startswith("0::")))


async def _children_while(b, zygote: psutil.Process, code: str):
    """The zygote's children (pid, cgroup), read while a job running ``code`` sleeps."""
    run = asyncio.ensure_future(b.run(spec(code)))
    await asyncio.sleep(1.0)
    kids = [(p.pid, _cgroup(p.pid)) for p in zygote.children()]
    return await run, kids


async def test_the_next_job_process_waits_beside_a_running_job(warm) -> None:
    assert (await warm.run(spec("print(1)"))).warm
    zygote = _zygote(warm)
    o, kids = await _children_while(
        warm, zygote, "import os, time\nprint(sorted(p for p in os.listdir('/proc') if p.isdigit()))\n"
        "time.sleep(2)\n")
    assert o.status is Status.success and o.warm, explain(o)
    assert o.stdout == b"['1']\n"  # the job sees no other process, the one waiting included
    assert len(kids) == 1 + FORK_DEPTH, kids  # the job and the next ones, forked ahead
    assert len({cg for _, cg in kids}) == len(kids)  # each in its own job cgroup


async def _waiting(b, zygote: psutil.Process) -> list[psutil.Process]:
    """The job processes forked ahead, once the zygote's steps are over (a job does not
    wait for the second fork)."""
    [z] = [z for zs in b.warm_pool.idle.values() for z in zs]
    await z.settle()
    await z.forked_ahead()
    for _ in range(100):
        if len(kids := zygote.children()) >= FORK_DEPTH:
            return kids
        await asyncio.sleep(0.02)
    return zygote.children()


async def test_a_job_process_killed_while_waiting_costs_no_job(warm) -> None:
    assert (await warm.run(spec("print(1)"))).warm
    zygote = _zygote(warm)
    waiting = await _waiting(warm, zygote)
    assert len(waiting) == FORK_DEPTH
    os.kill(waiting[0].pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    outs = [await warm.run(spec(f"print({i})")) for i in range(3)]
    assert [o.stdout for o in outs] == [b"0\n", b"1\n", b"2\n"], [explain(o) for o in outs]
    assert all(o.status is Status.success for o in outs)
    assert outs[-1].warm  # a new warm interpreter took over



async def test_ended_jobs_leave_no_descriptor_behind(warm) -> None:
    # Each job's mount namespace is held from its start until its clean-up step, and its
    # process's socket until it ends: none of that may pile up in the worker.
    async def run(n: int) -> None:
        for i in range(n):
            o = await warm.run(spec(f"print({i})"))
            assert o.status is Status.success and o.warm, explain(o)
        for z in (z for zs in warm.warm_pool.idle.values() for z in zs):
            await z.settle()

    await run(3)
    before = len(os.listdir("/proc/self/fd"))
    await run(30)
    assert len(os.listdir("/proc/self/fd")) <= before


def _slow_clean_ups(monkeypatch, seconds: float) -> None:
    """Each job's clean-up (its leftovers' removal, in a thread) takes ``seconds`` more."""
    from sandmill.isolation import warm as warm_mod

    remove = warm_mod._remove

    def slow_remove(*a, **k):  # type: ignore[no-untyped-def]
        time.sleep(seconds)
        remove(*a, **k)

    monkeypatch.setattr(warm_mod, "_remove", slow_remove)


async def test_the_next_fork_does_not_wait_for_the_clean_up_of_the_job_before(warm, monkeypatch) -> None:
    # The zygote moves itself on and forks at once; the ended job's clean-up (here made
    # slow) runs in a thread beside it. Before, the fork waited for the clean-up.
    assert (await warm.run(spec("print(1)"))).warm
    zygote = _zygote(warm)
    _slow_clean_ups(monkeypatch, 1.5)
    assert (await warm.run(spec("print(2)"))).warm  # its clean-up now takes 1.5 s
    run = asyncio.ensure_future(warm.run(spec("import time\ntime.sleep(1)\nprint(3)\n")))
    await asyncio.sleep(0.6)
    kids = zygote.children()
    o = await run
    assert o.warm and o.stdout == b"3\n", explain(o)
    assert len(kids) == 1 + FORK_DEPTH, kids  # the job and the ones forked ahead, already


async def test_a_job_does_not_wait_for_the_clean_ups_of_the_jobs_before(warm, monkeypatch) -> None:
    # Clean-ups run beside each other and the moves, not in a chain: with each one slower than a
    # job (here 0.8 s), the next jobs start at once while at most MAX_CLEANUPS_BEHIND (2)
    # are under way. Before, the third job waited for both steps before it (2 x 0.8 s).
    assert (await warm.run(spec("print(0)"))).warm
    [z] = [z for zs in warm.warm_pool.idle.values() for z in zs]
    await z.settle()
    _slow_clean_ups(monkeypatch, 0.8)
    t0 = time.monotonic()
    outs = [await warm.run(spec(f"print({i})")) for i in (1, 2, 3)]
    took = time.monotonic() - t0
    assert [o.stdout for o in outs] == [b"1\n", b"2\n", b"3\n"] and all(o.warm for o in outs)
    assert took < 0.7, took  # neither waited for a clean-up of 0.8 s
    await z.settle()
    assert not z.broken


async def test_clean_ups_slower_than_the_jobs_pile_up_no_further(warm, monkeypatch) -> None:
    # Each job's clean-up holds its mount namespace, work dir and cgroup: with clean-ups
    # slower than the jobs, a job starts only while at most MAX_CLEANUPS_BEHIND run (the
    # steps still queued behind a move, at most one per job process forked ahead, and the
    # job's own come on top). Without the bound all 8 would run at once.
    import threading

    from sandmill.isolation import warm as warm_mod

    remove, lock = warm_mod._remove, threading.Lock()
    now = most = 0

    def slow_remove(*a, **k):  # type: ignore[no-untyped-def]
        nonlocal now, most
        with lock:
            now += 1
            most = max(most, now)
        time.sleep(0.3)
        remove(*a, **k)
        with lock:
            now -= 1

    monkeypatch.setattr(warm_mod, "_remove", slow_remove)
    outs = [await warm.run(spec(f"print({i})")) for i in range(8)]
    assert all(o.warm and o.status is Status.success for o in outs), [explain(o) for o in outs]
    assert 2 <= most <= MAX_CLEANUPS_BEHIND + FORK_DEPTH, most
