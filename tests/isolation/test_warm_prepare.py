"""The next warm job's set-up made while a job runs (``Backend.prepare``,
isolation/warm_prepare.py): made before the job before it ends, taken by its run, and
nothing left behind when it is not."""

from __future__ import annotations

import asyncio

import psutil
import pytest
from test_conformance import explain, spec
from test_warm import _usable

from sandmill.isolation import Status
from sandmill.isolation.nsjail import NsjailBackend
from sandmill.isolation.process import ProcessBackend

pytestmark = pytest.mark.timeout(60)

SLOW = "import time\ntime.sleep(1.5)\nprint('a')\n"


@pytest.fixture(params=["process", "nsjail"])
def warm(request):
    b = _usable(ProcessBackend if request.param == "process" else NsjailBackend)
    yield b
    b.close()


def _zygotes(b):
    pool = b.warm_pool
    return [z for zs in pool.idle.values() for z in zs]


async def _prepared_during(b, nxt):
    """Run SLOW in a task (the lane); prepare ``nxt`` in it while SLOW runs. Returns the
    lane and the set-up, once made (SLOW still running)."""
    assert (await b.run(spec("print(0)"))).warm  # a zygote, its next job process forked
    lane = asyncio.ensure_future(b.run(spec(SLOW)))
    await asyncio.sleep(0.3)
    p = b.prepare(nxt, lane)
    assert p is not None
    for _ in range(100):
        if p.jp is not None:
            break
        await asyncio.sleep(0.01)
    assert not lane.done()  # the set-up was made while the job before it runs
    return lane, p


async def test_the_next_job_is_set_up_while_a_job_runs(warm) -> None:
    nxt = spec("import json\nprint(json.load(open('args.json')))\n", files={"args.json": b'{"x": 2}'})
    lane, p = await _prepared_during(warm, nxt)
    assert p.wd is not None and (p.wd / "args.json").read_bytes() == b'{"x": 2}'
    assert p.jp is not None and p.jp.pidfd is not None  # its W checked ahead
    assert p.z in warm.warm_pool.reserved
    first = await lane
    assert first.status is Status.success and first.stdout == b"a\n", explain(first)
    assert not _zygotes(warm)  # kept for the prepared job, not handed to another
    wd = p.wd
    out = await warm.run(nxt, prepared=p)
    assert out.status is Status.success and out.warm, explain(out)
    assert out.stdout == b"{'x': 2}\n"
    assert p.over and not warm.warm_pool.reserved
    for z in _zygotes(warm):
        await z.settle()
    assert not wd.exists()  # removed after its job, as any job's dir
    assert len(_zygotes(warm)) == 1


async def test_an_unused_set_up_leaves_nothing(warm) -> None:
    lane, p = await _prepared_during(warm, spec("print(2)"))
    wd, z = p.wd, p.z
    jp_cgroup = p.jp.cgroup
    await lane
    other = spec("print(3)")  # the run is for another job: the set-up goes
    out = await warm.run(other, prepared=p)
    assert out.status is Status.success and out.stdout == b"3\n" and out.warm, explain(out)
    p.discard()  # the caller's, after the run: a no-op by now
    assert p.over and not wd.exists()
    assert not warm.warm_pool.reserved and not warm.warm_pool.waiting
    assert _zygotes(warm) == [z]  # the same zygote took the other job
    await z.settle()
    # the job cgroup it had set up ran the other job, and is still the zygote's
    assert jp_cgroup.unique_dirs()[0].exists()


async def test_a_discarded_set_up_frees_its_zygote(warm) -> None:
    lane, p = await _prepared_during(warm, spec("print(2)"))
    wd, z = p.wd, p.z
    p.discard()  # e.g. the held job was canceled, or went back to the queue
    assert not wd.exists() and not warm.warm_pool.reserved
    await lane
    assert len(_zygotes(warm)) == 1  # back with the idle ones once its job ended
    out = await warm.run(spec("print(4)"))
    assert out.status is Status.success and out.stdout == b"4\n" and out.warm, explain(out)
    warm.close()
    assert not z.dir.exists()  # nothing of the set-up outlives the pool


async def test_a_failed_set_up_runs_the_job_the_normal_way(warm) -> None:
    assert (await warm.run(spec("print(0)"))).warm
    [z] = _zygotes(warm)
    lane = asyncio.ensure_future(warm.run(spec(SLOW)))
    await asyncio.sleep(0.3)
    # the job process forked for the next job dies before its check
    running = z.current.cgroup.pids() if z.current else []
    ahead = [c for c in psutil.Process(z.pid).children() if c.pid not in running]
    for c in ahead:
        c.kill()
    await asyncio.sleep(0.1)
    nxt = spec("print(5)")
    p = warm.prepare(nxt, lane)
    await lane
    out = await warm.run(nxt, prepared=p)
    p.discard()
    assert out.status is Status.success and out.stdout == b"5\n", explain(out)
    assert not warm.warm_pool.reserved


async def test_a_set_up_asked_before_the_job_before_starts_waits_for_its_j(warm) -> None:
    assert (await warm.run(spec("print(0)"))).warm
    nxt = spec("print(6)")
    box = {}

    async def lane_body():
        # the set-up asked from the lane itself before its job: bound once that job's J went
        box["p"] = warm.prepare(nxt, asyncio.current_task())
        assert box["p"].z is None and warm.warm_pool.waiting
        first = await warm.run(spec(SLOW))
        assert box["p"].jp is not None  # made while SLOW ran
        return first, await warm.run(nxt, prepared=box["p"])

    first, out = await lane_body_task(lane_body)
    assert first.stdout == b"a\n" and out.stdout == b"6\n" and out.warm, explain(out)
    assert box["p"].over and not warm.warm_pool.reserved and not warm.warm_pool.waiting


async def lane_body_task(body):
    return await asyncio.ensure_future(body())
