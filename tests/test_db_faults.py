"""Faults that are not the job's: a completion the database refuses costs that job only,
a job that killed two workers is not handed to a third, and PostgreSQL stopped or
restarted under load loses nothing and completes nothing twice (the API answering 503
meanwhile). The database faults run on a PostgreSQL of this module's own, so that
stopping it does not hurt other tests."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid

import httpx
import pytest

from bench.faults import FaultPG, run_faults
from sandmill.localcluster import LocalCluster
from sandmill.store import db as dbmod
from support import TOKEN, wait_done
from test_recovery import proc_of, wait_running

NATIVE = "name: {name}\ntags: [{tag}]\nnative: true\nsubworkers: {n}\nlimits: {{wall_s: 300}}\n"
FAST_MONITOR = {"SANDMILL_PING_TIMEOUT_S": "3", "SANDMILL_MONITOR_EVERY_S": "0.5"}


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def sleep_job(api: httpx.Client, ws: str, tag: str, seconds: float, **args) -> str:
    r = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                 json={"language": "sleep", "content": "", "args": {"seconds": seconds, **args}})
    assert r.status_code == 201, r.text
    return r.text.strip().strip('"')


async def _rows(url: str, sql: str, *args) -> list:
    conn = await dbmod.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def _execute(url: str, sql: str) -> None:
    conn = await dbmod.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def rows(url: str, sql: str, *args) -> list:
    return asyncio.run(_rows(url, sql, *args))


@pytest.fixture(scope="module")
def fault_pg():
    pg = FaultPG(max_connections=200)
    try:
        yield pg
    finally:
        pg.close()


# ---- a refused completion ---------------------------------------------------------------------

REFUSE = """
CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.args->>'poison' = 'yes' AND coalesce(NEW.error, '') NOT LIKE 'internal error:%' THEN
        RAISE EXCEPTION 'poisoned job % refused', NEW.id USING ERRCODE = 'data_exception';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse_poison BEFORE INSERT ON completed_job
    FOR EACH ROW EXECUTE FUNCTION refuse_poison();
"""


def test_a_refused_completion_fails_that_job_only_and_the_worker_serves_on(fault_pg, tmp_path):
    url = fault_pg.database("refuse")
    asyncio.run(_execute(url, REFUSE))  # this test's own database: the trigger refuses the poisoned job's result
    c = LocalCluster(url, tmp_path / "c", token=TOKEN, env=FAST_MONITOR)
    try:
        c.start_server()
        group = tag = uid("refuse")
        p = c.start_worker(profile_text=NATIVE.format(name=group, tag=tag, n=8))
        c.wait_workers(group)
        with c.client() as api:
            # jobs that end together, so their completions share a statement
            poison = sleep_job(api, ws := uid("ws"), tag, 0.3, poison="yes")
            others = [sleep_job(api, ws, tag, 0.3) for _ in range(7)]
            bad = wait_done(api, ws, poison, timeout=20)
            good = [wait_done(api, ws, j, timeout=20) for j in others]
            later = wait_done(api, ws, sleep_job(api, ws, tag, 0), timeout=20)
        assert bad["success"] is False and bad["restarts"] == 0
        assert bad["error"].startswith("internal error: its completion was refused by the database")
        assert "poisoned job" in bad["error"]
        assert bad["result"]["error"]["name"] == "InternalError"
        assert all(j["success"] and j["restarts"] == 0 for j in good)
        assert p.poll() is None and later["success"] and later["worker"] == bad["worker"]
        n = rows(url, "SELECT count(*) AS n FROM completed_job WHERE id = ANY($1::uuid[])",
                 [uuid.UUID(i) for i in [poison, *others]])[0]["n"]
        assert n == 8
    finally:
        c.stop()


# ---- dead workers ------------------------------------------------------------------------------

def test_a_job_that_killed_two_workers_is_not_handed_to_a_third(make_cluster, ws):
    c = make_cluster(env={"SANDMILL_PING_TIMEOUT_S": "2", "SANDMILL_MONITOR_EVERY_S": "0.5"})
    group = tag = uid("mortal")
    for _ in range(3):
        c.start_worker(profile_text=NATIVE.format(name=group, tag=tag, n=1))
    c.wait_workers(group, count=3)
    with c.client() as api:
        jid = sleep_job(api, ws, tag, 60)
        dead = []
        for _ in range(2):
            w = wait_running(api, ws, jid, timeout=30, not_worker=dead[-1] if dead else None,
                             log_needle=None)["worker"]
            victim = proc_of(c, w)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            dead.append(w)
        j = wait_done(api, ws, jid, timeout=30)
    assert j["success"] is False and j["restarts"] == 2 and j["worker"] == dead[1]
    assert j["result"]["error"]["name"] == "WorkerDied"
    assert f"worker {dead[1]} died while running this job, the 2nd worker to die running it" in j["error"]
    assert "a job survives 1 dead worker(s) (SANDMILL_MAX_RESTARTS)" in j["error"]
    assert "restart 2 of this job" not in j["logs"]  # never run a third time


# ---- PostgreSQL stopped, and restarted under load ---------------------------------------------

def test_postgres_stopped_for_seconds_loses_nothing_and_the_api_answers_503(fault_pg, tmp_path):
    url = fault_pg.database("stop")
    c = LocalCluster(url, tmp_path / "c", token=TOKEN, env=FAST_MONITOR)
    try:
        c.start_server()
        group = tag = uid("stop")
        workers = [c.start_worker(profile_text=NATIVE.format(name=group, tag=tag, n=4)) for _ in range(2)]
        c.wait_workers(group, count=2)
        ws = uid("ws")
        with c.client() as api:
            # running through the outage (their heartbeats go stale), ending during it
            # (their completions wait for the database), and waiting in the queue
            jobs = [sleep_job(api, ws, tag, s) for s in (1.5, 1.5, 4, 4, 8, 8, 0.2, 0.2, 0.2, 0.2)]
            waited: dict = {}
            w = threading.Thread(target=lambda: waited.update(r=api_wait(c, ws, tag, 3)))
            w.start()
            time.sleep(1.0)
            fault_pg.stop()
            t_stop = time.monotonic()
            answers = []
            while time.monotonic() - t_stop < 6:  # twice the ping timeout
                r = api.get(f"/api/w/{ws}/jobs_u/get/{jobs[0]}")
                answers.append((r.status_code, r.headers.get("content-type", ""), r.text))
                time.sleep(0.2)
            fault_pg.start()
            done = [wait_done(api, ws, j, timeout=60) for j in jobs]
            w.join(timeout=60)
            after = wait_done(api, ws, sleep_job(api, ws, tag, 0), timeout=15)  # NOTIFY heard again
        assert answers and {a[0] for a in answers} == {503}, answers[:3]
        assert all("application/json" in a[1] and "database unavailable" in a[2] for a in answers)
        assert all(j["success"] for j in done), [j["error"] for j in done if not j["success"]]
        assert all(j["restarts"] == 0 for j in done)  # no stale heartbeat was taken for a dead worker
        n = rows(url, "SELECT id, count(*) AS n FROM completed_job WHERE id = ANY($1::uuid[]) GROUP BY id",
                 [uuid.UUID(i) for i in jobs])
        assert len(n) == len(jobs) and all(r["n"] == 1 for r in n)
        assert waited["r"].status_code == 200, waited["r"].text  # a wait spanning the outage
        assert after["success"]
        assert all(p.poll() is None for p in workers)  # the same processes, never restarted
        with c.client() as api:
            listed = {x["worker"] for x in api.get("/api/workers/list").json() if x["worker_group"] == group}
        assert {d["worker"] for d in done} <= listed
    finally:
        c.stop()


def api_wait(c: LocalCluster, ws: str, tag: str, seconds: float) -> httpx.Response:
    with c.client() as api:
        return api.post(f"/api/w/{ws}/jobs/run_wait_result/preview", params={"tag": tag},
                        json={"language": "sleep", "content": "", "args": {"seconds": seconds}})


def test_load_with_a_worker_killed_and_postgres_restarted_completes_every_job_once(fault_pg):
    run = run_faults(jobs=500, clients=10, kills=1, restarts=1, processes=2, subworkers=4,
                     sleep_s=0.01, timeout_s=120, pg=fault_pg)
    assert len(run.faults) == 2, run.faults
    assert not run.other_errors, run.other_errors[:5]
    assert run.exactly_once, {i: n for i, n in run.completions.items() if n != 1}
    assert run.workers_alive
