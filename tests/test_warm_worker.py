"""A worker's warm interpreters (isolation/warm.py) live and die with the worker: python3
and bash jobs run warm through the whole path, and nothing of them outlives a SIGTERM
or a SIGKILL of the worker."""

from __future__ import annotations

import signal
import uuid

import psutil
import pytest

from support import wait_done

PROFILE = """
name: {name}
tags: [{tag}]
backend: {{kind: {kind}}}
subworkers: 2
"""


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive_after(procs: list[psutil.Process], timeout: float = 10) -> list[int]:
    """The pids of ``procs`` still running after ``timeout`` s (zombies count as gone)."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    out = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return out


@pytest.mark.parametrize("kind", ["process", "nsjail"])
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL])
def test_warm_jobs_and_nothing_outlives_the_worker(make_cluster, ws, kind, stop):
    c = make_cluster()
    tag = f"warm-{uuid.uuid4().hex[:6]}"
    w = c.start_worker(profile_text=PROFILE.format(name=tag, tag=tag, kind=kind))
    c.wait_workers(tag)
    with c.client() as api:
        py = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                      json={"content": "def main(x):\n    return x * 2\n", "language": "python3",
                            "args": {"x": 21}}).text
        sh = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                      json={"content": 'echo "$1$1"\n', "language": "bash", "args": {"a": "ab"}}).text
        jp, jb = wait_done(api, ws, py), wait_done(api, ws, sh)
    assert jp["result"] == 42 and jp["outcome"]["warm"] is True, jp
    assert jb["result"] == "abab" and jb["outcome"]["warm"] is True, jb
    kids = _descendants(w.pid)
    assert kids, "the worker should hold its warm interpreters"
    w.send_signal(stop)
    w.wait(timeout=30)
    assert not _alive_after(kids), "warm interpreters or job processes outlived the worker"
