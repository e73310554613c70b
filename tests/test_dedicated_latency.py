"""A dedicated job's short path (issue 18's fib(10) p50 goal): what it costs the worker
between jobs and the round trips a run_wait_result takes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import psutil

from sandmill.server.waiters import Result, ResultWaiters, parse_done
from sandmill.store import db as dbmod
from sandmill.store import jobs as store_jobs
from sandmill.store import queue
from test_dedicated import done, group, script

from bench.common import tree_cpu_s


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
    before = tree_cpu_s(worker)
    time.sleep(3)
    used = tree_cpu_s(worker) - before
    assert used < 0.5, f"the idle worker and its runtime used {used:.2f} s of CPU in 3 s"


PROFILE = """
name: {name}
dedicated_workers: ["{ws}:{path}"]
backend: {{kind: process}}
"""


def _group(c, ws: str, path: str) -> str:
    """A dedicated worker that reports its statement counts every half second."""
    name = "ded-" + uuid.uuid4().hex[:6]
    c.start_worker(profile_text=PROFILE.format(name=name, ws=ws, path=path),
                   env={"SANDMILL_WORKER_PING_S": "0.5"})
    c.wait_workers(name)
    return name


async def _claims(url: str, group: str) -> int:
    conn = await dbmod.connect(url)
    try:
        info = await conn.fetchval("SELECT info FROM worker WHERE worker_group = $1", group)
    finally:
        await conn.close()
    hist = ((info or {}).get("statement_latency") or {}).get("dedicated_claim") or {}
    return sum(hist.get("counts", []))


def test_a_lone_job_costs_one_claim(make_cluster, pg_url, ws):
    # a claim that took fewer jobs than it asked for means nothing else was due: the loop
    # waits for the next NOTIFY instead of sending an empty claim after every job
    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/id", "def main(x):\n    return x\n")
        name = _group(c, ws, "f/id")
        for i in range(10):
            r = api.post(f"/api/w/{ws}/jobs/run_wait_result/p/f/id", json={"x": i})
            assert r.status_code == 200 and r.json() == i, r.text
    time.sleep(1.5)  # a ping or two after the last job
    n = asyncio.run(_claims(pg_url, name))
    assert 10 <= n <= 12, f"{n} claims for 10 jobs one after the other"


async def _listen_run(url: str, api, ws: str, path: str, args: dict) -> tuple[list[str], object]:
    """Run ``path`` through run_wait_result while listening on sandmill_done."""
    got: list[str] = []
    conn = await dbmod.connect(url)
    try:
        await conn.add_listener(queue.CH_DONE, lambda _c, _p, _ch, payload: got.append(payload))
        r = await asyncio.to_thread(api.post, f"/api/w/{ws}/jobs/run_wait_result/p/{path}", json=args)
        for _ in range(100):
            if got:
                break
            await asyncio.sleep(0.05)
    finally:
        await conn.close()
    return got, r


ANSWER = """
def main(kind):
    if kind == "big":
        return "x" * 10000
    if kind == "fail":
        raise ValueError("no")
    return {"a": [1, 2.5, None], "b": "é"}
"""


def test_the_completion_notify_carries_the_result(make_cluster, pg_url, ws):
    # the API answers from the NOTIFY: no read of the job after it completes
    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/answer", ANSWER)
        _group(c, ws, "f/answer")
        got, r = asyncio.run(_listen_run(pg_url, api, ws, "f/answer", {"kind": "small"}))
        jid = r.headers["x-sandmill-job-id"]
        assert r.status_code == 200 and r.json() == {"a": [1, 2.5, None], "b": "é"}, r.text
        assert len(got) == 1 and got[0].startswith(f"{jid} 1{{"), got
        assert json.loads(got[0][38:]) == r.json()

        got, r = asyncio.run(_listen_run(pg_url, api, ws, "f/answer", {"kind": "fail"}))
        jid = r.headers["x-sandmill-job-id"]
        assert r.status_code == 400 and r.json()["error"]["name"] == "ValueError", r.text
        assert got[0].startswith(f"{jid} 0{{"), got

        # too big for a NOTIFY (under 8000 bytes): the id alone, and the API reads the result
        got, r = asyncio.run(_listen_run(pg_url, api, ws, "f/answer", {"kind": "big"}))
        assert r.status_code == 200 and r.json() == "x" * 10000
        assert got == [r.headers["x-sandmill-job-id"]]


def test_parse_done_reads_both_payloads():
    jid = uuid.uuid4()
    assert parse_done(str(jid)) == (jid, None)
    assert parse_done(f"{jid} 1[1, 2]") == (jid, Result(True, "[1, 2]"))
    assert parse_done(f"{jid} 0{{}}") == (jid, Result(False, "{}"))
    w = ResultWaiters()
    w.on_done(None, 0, "", "not a job id")  # logged, never raised into the listener


def test_a_run_by_path_runs_the_newest_version_without_reading_it_first(make_cluster, pg_url, ws):
    # the server remembers the newest version of a path it ran and queues the next run in
    # one statement (push_if_latest); a newer version, created since, is read and run
    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/v", "def main():\n    return 1\n")
        _group(c, ws, "f/v")
        for _ in range(2):
            r = api.post(f"/api/w/{ws}/jobs/run_wait_result/p/f/v", json={})
            assert r.status_code == 200 and r.json() == 1, r.text
        script(api, ws, "f/v", "def main():\n    return 2\n")
        r = api.post(f"/api/w/{ws}/jobs/run_wait_result/p/f/v", json={})
        assert r.status_code == 200 and r.json() == 2, r.text
        r = api.post(f"/api/w/{ws}/jobs/run/p/f/v", json={})
        assert r.status_code == 201
        assert done(api, ws, r.text)["result"] == 2
        # a path with no script: 404 as before
        r = api.post(f"/api/w/{ws}/jobs/run_wait_result/p/f/nope", json={})
        assert r.status_code == 404 and "f/nope" in r.json()["error"], r.text


async def _push_if_latest(url: str, ws: str, path: str, h: str) -> object:
    conn = await dbmod.connect(url)
    try:
        return await store_jobs.push_if_latest(
            conn, workspace=ws, language="python3", content="", args={}, tag="t",
            script_path=path, script_hash=h)
    finally:
        await conn.close()


def test_push_if_latest_queues_only_the_newest_version(make_cluster, pg_url, ws):
    c = make_cluster()
    with c.client() as api:
        old = script(api, ws, "f/w", "def main():\n    return 1\n")
        assert isinstance(asyncio.run(_push_if_latest(pg_url, ws, "f/w", old)), uuid.UUID)
        new = script(api, ws, "f/w", "def main():\n    return 2\n")
    assert asyncio.run(_push_if_latest(pg_url, ws, "f/w", old)) is None
    assert isinstance(asyncio.run(_push_if_latest(pg_url, ws, "f/w", new)), uuid.UUID)
    assert asyncio.run(_push_if_latest(pg_url, ws, "f/none", new)) is None
