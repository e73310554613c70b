"""A warm zygote's job cgroups: every one it makes is gone after its close, also when
jobs end before the thread step of the job before them is over (a slow host)."""

from __future__ import annotations

import asyncio
import time

import pytest

from sandmill.isolation import Limits, RunSpec, warm, workdir
from sandmill.isolation.cgroups import JobCgroup
from sandmill.isolation.process import ProcessBackend

pytestmark = pytest.mark.timeout(60)


async def test_no_job_cgroup_is_left_behind_when_steps_fall_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[JobCgroup] = []
    create = JobCgroup.create.__func__  # type: ignore[attr-defined]

    def recording(cls, *a, **k):  # type: ignore[no-untyped-def]
        cg = create(cls, *a, **k)
        made.append(cg)
        return cg

    monkeypatch.setattr(JobCgroup, "create", classmethod(recording))
    remove = warm._remove

    def slow_remove(*a, **k):  # type: ignore[no-untyped-def]
        time.sleep(0.03)  # each job ends before the step of the job before it is over
        remove(*a, **k)

    monkeypatch.setattr(warm, "_remove", slow_remove)
    b = ProcessBackend(warm=True, workdir_root=str(workdir.owner_root(workdir.default_root())))
    if b.warm_pool is None:
        pytest.skip("no warm pool for the process backend here (needs root and cgroups)")
    try:
        for i in range(12):
            o = await b.run(RunSpec(argv=["/bin/echo", str(i)], env={"PATH": "/usr/bin:/bin"}, files={},
                                    limits=Limits(wall_s=10)))
            assert o.warm and o.stdout == f"{i}\n".encode(), o
    finally:
        b.close()
    deadline = time.monotonic() + 5  # the last job's step (in a thread) may still run
    while (left := [cg for cg in made if any(d.exists() for d in cg.unique_dirs())]) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert made and not left, f"{len(left)} of {len(made)} job cgroups left behind"


async def test_the_zygote_moves_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    # Into each job's cgroup by its own write of "0" (M): the worker never writes the
    # zygote's pid to a cgroup.procs per job (on cgroup v1 such a move takes a global lock
    # and now and then waits for an RCU grace period, stalling every fork and exit on the
    # host for 10-25 ms). Before, every job's move went through JobCgroup.add.
    b = ProcessBackend(warm=True, workdir_root=str(workdir.owner_root(workdir.default_root())))
    if b.warm_pool is None:
        pytest.skip("no warm pool for the process backend here (needs root and cgroups)")
    try:
        spec = RunSpec(argv=["/bin/sh", "-c", "cat /proc/self/cgroup"], env={"PATH": "/usr/bin:/bin"},
                       files={}, limits=Limits(wall_s=10))
        assert (await b.run(spec)).warm  # the zygote's start (its home cgroup: once, by pid)

        def by_pid(self, pid):  # type: ignore[no-untyped-def]
            raise AssertionError(f"a job's move wrote pid {pid}")

        monkeypatch.setattr(JobCgroup, "add", by_pid)
        outs = [await b.run(spec) for _ in range(6)]
        assert all(o.warm for o in outs), [o.detail for o in outs]
        # each in a job cgroup (one of an ended job may serve again: JobCgroup.recycle)
        assert all(b"/sandmill/job-" in o.stdout for o in outs), [o.stdout for o in outs]
    finally:
        b.close()
