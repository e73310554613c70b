"""A slot's next job is set up in its backend while the slot's job runs (worker/ahead.py,
``Executor.prepare``; isolation/warm_prepare.py): the next held job's work dir and
request exist before the job before it ends, its run takes them, and a set-up for a job
that does not run next leaves nothing behind. The worker's parts without a database."""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

import pytest

from sandmill.isolation.process import ProcessBackend
from sandmill.profiles import profile_from_dict
from sandmill.store import queue
from sandmill.worker.ahead import NextSetUp
from sandmill.worker.execute import Executor
from sandmill.worker.feed import Answer, SlotState

pytestmark = pytest.mark.timeout(60)


class _Watch:
    def arm(self) -> None:
        pass


class _Group:
    name = "ahead-test"
    tags: list[str] = []
    pool = None
    gpus = None
    q = queue

    def __init__(self, backend: ProcessBackend) -> None:
        self.profile = profile_from_dict({"name": "g", "tags": ["t"], "backend": {"kind": "process"}})
        self.env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        self.backend = backend


def _job(content: str) -> dict[str, Any]:
    return {"id": uuid.uuid4(), "language": "bash", "content": content, "args": {},
            "restarts": 0, "timeout_s": None, "kind": "script"}


@pytest.fixture
def executor():
    if os.geteuid() != 0:
        pytest.skip("warm interpreters need root here")
    b = ProcessBackend()
    if b.warm_pool is None:
        pytest.skip("no warm interpreters here")
    yield Executor(_Group(b), {}, set(), _Watch())  # type: ignore[arg-type]
    b.close()


async def _made_while(nxt: NextSetUp, running: asyncio.Future) -> bool:
    """Whether the next job's set-up (its work dir, its request) is made while ``running``
    has not ended."""
    for _ in range(150):
        a = nxt.ahead
        if a is not None and getattr(a.prepared, "req", None) is not None:
            return not running.done() and a.prepared.wd.exists()
        await asyncio.sleep(0.01)
    return False


async def test_the_next_held_job_is_set_up_while_the_job_runs(executor) -> None:
    ex = executor
    slow, nxt_job = _job("sleep 1\necho a\n"), _job("echo b\n")
    assert (await ex.execute_deferred(_job("echo 0\n")))[0].status == "success"  # warm now
    st = SlotState()
    st.ready.append(nxt_job)  # held ahead

    async def slot():
        # the lane: the task that runs the jobs (a slot runs them inline in its own)
        first = asyncio.ensure_future(ex.execute_deferred(slow))
        nxt = NextSetUp(ex, st, first)
        seen = await _made_while(nxt, first)
        a = (await first)[0]
        made = nxt.take(nxt_job)
        b = (await ex.execute_deferred(nxt_job, made))[0]
        return seen, a, b, made

    seen, a, b, made = await asyncio.ensure_future(slot())
    assert seen, "the next job's set-up was not made while the job before it ran"
    assert a.status == "success" and a.result == "a"
    assert b.status == "success" and b.result == "b", b
    assert made is not None and made.prepared.over and not ex.group.backend.warm_pool.reserved


async def test_a_set_up_for_a_job_that_does_not_run_next_leaves_nothing(executor) -> None:
    ex = executor
    assert (await ex.execute_deferred(_job("echo 0\n")))[0].status == "success"
    pool = ex.group.backend.warm_pool
    st = SlotState()
    claim: asyncio.Future = asyncio.get_running_loop().create_future()
    st.coming.append((claim, 1))  # the claim of the next job is still in flight
    held, other = _job("echo held\n"), _job("echo other\n")

    async def slot():
        first = asyncio.ensure_future(ex.execute_deferred(_job("sleep 1\necho a\n")))
        nxt = NextSetUp(ex, st, first)
        await asyncio.sleep(0.2)
        claim.set_result(Answer(None, [held]))  # it comes back while the job runs
        seen = await _made_while(nxt, first)
        wd = nxt.ahead.prepared.wd
        await first
        made = nxt.take(other)  # e.g. the held job went back to the queue meanwhile
        out = (await ex.execute_deferred(other, made))[0]
        return seen, wd, made, out

    seen, wd, made, out = await asyncio.ensure_future(slot())
    assert seen
    assert made is None and not wd.exists()  # its work dir is gone
    assert out.status == "success" and out.result == "other"
    assert not pool.reserved and not pool.waiting
    assert len([z for zs in pool.idle.values() for z in zs]) == 1  # the zygote went on


async def test_a_canceled_held_job_drops_its_set_up(executor) -> None:
    ex = executor
    assert (await ex.execute_deferred(_job("echo 0\n")))[0].status == "success"
    job = _job("echo x\n")

    async def slot():
        made = ex.prepare(job, asyncio.current_task())
        assert made is not None
        ex.canceled_held.add(job["id"])  # canceled while held
        return made, (await ex.execute_deferred(job, made))[0]

    made, out = await asyncio.ensure_future(slot())
    assert out.status == "failure" and "canceled" in (out.error or "")
    assert made.prepared.over and not ex.group.backend.warm_pool.reserved
    assert not ex.group.backend.warm_pool.waiting
