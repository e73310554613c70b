"""A dedicated job's short path (issue 18's fib(10) p50 goal): what it costs the worker
between jobs and the round trips a run_wait_result takes."""

from __future__ import annotations

import time

import psutil

from test_dedicated import group, script


def _cpu_s(p: psutil.Process) -> float:
    total = 0.0
    for q in [p, *p.children(recursive=True)]:
        try:
            t = q.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def test_an_idle_dedicated_worker_uses_no_cpu(make_cluster, ws):
    # the runtime's own stdout reached EOF once its first job took fds 1 and 2, and the
    # reader left on it spun the worker at a whole core between jobs
    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/echo", "def main(x):\n    print(x)\n    return x\n")
        group(c, ws, ["f/echo"])
        for i in range(3):
            r = api.post(f"/api/w/{ws}/jobs/run_wait_result/p/f/echo", json={"x": i})
            assert r.status_code == 200 and r.json() == i, r.text
    worker = psutil.Process(c.procs[-1].pid)
    time.sleep(0.5)
    before = _cpu_s(worker)
    time.sleep(3)
    used = _cpu_s(worker) - before
    assert used < 0.5, f"the idle worker and its runtime used {used:.2f} s of CPU in 3 s"
