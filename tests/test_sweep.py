"""Leftovers of a SIGKILLed worker (its jobs' work dirs, empty job cgroups) are swept by
a later worker, and nothing a live worker or job uses is."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from sandmill.isolation import cgroup_sweep, cgroups, workdir
from support import wait_done


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _old(d: Path, age_s: float = 3600) -> Path:
    d.mkdir(parents=True)
    (d / "job-x").mkdir()
    t = time.time() - age_s
    os.utime(d, (t, t))
    return d


def test_workdir_sweep_removes_dead_workers_roots_only(tmp_path):
    ns, pid = workdir._pid_ns(), _dead_pid()
    mine = workdir.owner_root(tmp_path)
    dead = _old(tmp_path / f"w-{ns}-{pid}-1")
    reused = _old(tmp_path / f"w-{ns}-{os.getpid()}-1")  # our pid, another start time
    alive = _old(mine)
    young = tmp_path / f"w-{ns}-{pid}-2"
    young.mkdir()  # its worker died just now: its jobs get the grace period
    other_ns = _old(tmp_path / f"w-1-{pid}-1")  # another container's: pids mean nothing here
    legacy = _old(tmp_path / "job-abc")  # not a worker root: never touched
    removed = workdir.sweep_stale(tmp_path, older_than_s=60)
    assert sorted(removed) == sorted([dead, reused])
    assert not dead.exists() and not reused.exists()
    assert all(d.exists() for d in (alive, young, other_ns, legacy))


def test_cgroup_sweep_removes_empty_job_cgroups_only():
    gap = cgroups.probe_gap()
    if gap:
        pytest.skip(gap)
    parent = f"sandmill-sweeptest-{uuid.uuid4().hex[:6]}"  # not the shared parent: live jobs
    empty = cgroups.JobCgroup.create(None, None, parent=parent)
    busy = cgroups.JobCgroup.create(None, None, parent=parent)
    warm = cgroups.JobCgroup.create(None, None, parent=parent, prefix="warm")
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        busy.add(sleeper.pid)
        removed = cgroup_sweep.sweep_stale(recheck_s=0.1, parent=parent)
        assert sorted(removed) == sorted(empty.unique_dirs() + warm.unique_dirs())
        assert all(not d.exists() for d in empty.unique_dirs() + warm.unique_dirs())
        assert all(d.exists() for d in busy.unique_dirs())
    finally:
        sleeper.kill()
        sleeper.wait()
        busy.kill_all()
        busy.remove()
        for _, p in cgroups._PARENTS.pop(parent, ()):
            p.rmdir()


PROFILE = """
name: {name}
tags: [{tag}]
backend: {{kind: process, workdir_root: "{root}"}}
subworkers: 1
limits: {{wall_s: 60, memory_mb: 512, pids: 128}}
"""


def test_worker_sweeps_a_sigkilled_workers_work_dirs(make_cluster, api, ws):
    """A worker keeps its work dirs under a root named after itself; SIGKILL it in the
    middle of a job, and the next worker's start removes what it left."""
    tag = "sweep-" + uuid.uuid4().hex[:6]
    # where the job user can reach it (a pytest tmp dir is root's alone)
    root = Path(tempfile.gettempdir() if os.geteuid() else "/var/tmp") / f"sandmill-{tag}"
    try:
        _sigkill_then_sweep(make_cluster, api, ws, tag, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _sigkill_then_sweep(make_cluster, api, ws, tag: str, root: Path) -> None:
    c = make_cluster(env={"SANDMILL_SWEEP_GRACE_S": "0", "SANDMILL_SWEEP_EVERY_S": "0.5"})
    first = c.start_worker(profile_text=PROFILE.format(name="sweep1", tag=tag, root=root))
    job = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                   json={"content": "sleep 5", "language": "bash"}).text
    deadline = time.time() + 30
    while not any(root.glob("w-*/**/job-*")) and time.time() < deadline:
        time.sleep(0.05)
    (left,) = [d for d in root.iterdir() if d.name.startswith("w-")]
    assert any(left.rglob("job-*")), "the job's work dir is under the worker's own root"
    first.send_signal(signal.SIGKILL)
    first.wait()
    api.post(f"/api/w/{ws}/jobs_u/queue/cancel/{job}", json={"reason": "test over"})
    c.start_worker(profile_text=PROFILE.format(name="sweep2", tag=tag, root=root))
    deadline = time.time() + 30
    while left.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert not left.exists(), "the dead worker's work dirs were not swept"
    # the live worker's own root stays, and its jobs run
    ok = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                  json={"content": "echo 1", "language": "bash"}).text
    assert wait_done(api, ws, ok)["status"] == "success"
    assert [d for d in root.iterdir() if d.name.startswith("w-")], "the live worker's root is there"
