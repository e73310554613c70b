"""Workers that die or are told to stop: jobs are requeued by the monitor (up to a restart
limit), SIGTERM finishes or hands back the job in hand, and an idle cluster barely loads
the database."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid


from bench.idle_load import measure_commits_per_s
from support import REPO, wait_done
from sandmill.store import db as dbmod
from sandmill.store import queue
from sandmill.localcluster import LocalCluster


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"




def submit(api, ws: str, content: str, tag: str) -> str:
    r = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                 json={"content": content, "language": "python3", "args": {}})
    assert r.status_code == 201, r.text
    return r.text


def wait_running(api, ws: str, jid: str, timeout: float = 20, not_worker: str | None = None,
                 log_needle: str | None = "started") -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        j = api.get(f"/api/w/{ws}/jobs_u/get/{jid}").json()
        if (j.get("running") and j["worker"] != not_worker
                and (log_needle is None or log_needle in j["logs"])):
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {jid} not running (on another worker than {not_worker}) in {timeout}s: {j}")


def proc_of(c: LocalCluster, worker_name: str) -> subprocess.Popen:
    pid = int(worker_name.split("-")[-2])  # <group>-<host>-<pid>-<rand>
    return next(p for p in c.procs if p.pid == pid)


SLEEPER = "import time\ndef main():\n    print('started', flush=True)\n    time.sleep({s})\n    return 'done'\n"


# ---- 5. recovery ------------------------------------------------------------------------------

def test_killed_worker_job_is_requeued_and_completes_once_elsewhere(make_cluster, ws):
    c = make_cluster(env={"SANDMILL_PING_TIMEOUT_S": "3", "SANDMILL_MONITOR_EVERY_S": "1"})
    group, tag = uid("rec"), uid("rec")
    c.start_worker(name=group, tags=tag)
    c.start_worker(name=group, tags=tag)
    c.wait_workers(group, count=2)
    with c.client() as api:
        jid = submit(api, ws, SLEEPER.format(s=8), tag)
        first = wait_running(api, ws, jid)["worker"]
        victim = proc_of(c, first)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        t_kill = time.time()
        again = wait_running(api, ws, jid, timeout=15, not_worker=first, log_needle=None)
        assert time.time() - t_kill < 15
        j = wait_done(api, ws, jid, timeout=30)
    assert j["success"] is True and j["result"] == "done"
    assert j["restarts"] == 1 and j["worker"] == again["worker"] != first
    assert j["logs"].count("started") == 2  # ran twice: once cut short, once to the end
    assert f"worker {first} stopped answering" in j["logs"]
    assert f"restart 1 of this job, on worker {j['worker']}" in j["logs"]


async def test_restart_limit_fails_the_job_saying_why(pg_url, ws):
    conn = await dbmod.connect(pg_url)
    try:
        tag = uid("doomed")
        jid = await queue.push(conn, workspace=ws, language="python3", content="def main(): pass",
                               args={}, tag=tag)
        actions = []
        for i in range(3):
            job = await queue.pull(conn, f"mortal-{i}", [tag])
            assert job and job["id"] == jid and job["restarts"] == i
            # its worker dies: the heartbeat goes stale (2 s, under the live monitors' timeout)
            await conn.execute("UPDATE queue SET last_ping = now() - interval '2 seconds' WHERE id = $1", jid)
            acts = [a for a in await queue.requeue_stale(conn, 1, max_restarts=2) if a["id"] == jid]
            actions += [a["action"] for a in acts]
        assert actions == ["requeued", "requeued", "failed"]
        assert await queue.pull(conn, "mortal-x", [tag]) is None
        j = await queue.get_job(conn, ws, jid)
    finally:
        await conn.close()
    assert j["type"] == "CompletedJob" and j["status"] == "failure" and j["restarts"] == 3
    assert ("worker mortal-2 died while running this job, the 3rd worker to die running it;"
            " a job survives 2 dead worker(s) (SANDMILL_MAX_RESTARTS)") in j["error"]
    assert j["result"]["error"]["name"] == "WorkerDied"


# ---- 6. SIGTERM -------------------------------------------------------------------------------

def test_sigterm_stops_pulling_finishes_the_job_and_exits_0(make_cluster, ws):
    c = make_cluster()
    group, tag = uid("term"), uid("term")
    p = c.start_worker(name=group, tags=tag)
    c.wait_workers(group)
    with c.client() as api:
        jid = submit(api, ws, SLEEPER.format(s=3), tag)
        wait_running(api, ws, jid)
        p.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        later = submit(api, ws, SLEEPER.format(s=0), tag)  # must not be taken any more
        assert p.wait(timeout=30) == 0
        j = wait_done(api, ws, jid, timeout=5)
        assert j["success"] is True and j["result"] == "done"
        q = api.get(f"/api/w/{ws}/jobs_u/get/{later}").json()
        assert q["type"] == "QueuedJob" and q["running"] is False and q["worker"] is None
        assert not [w for w in api.get("/api/workers/list").json() if w["worker_group"] == group]
        api.post(f"/api/w/{ws}/jobs_u/queue/cancel/{later}", json={})


def test_sigterm_after_grace_requeues_the_job_for_another_worker(make_cluster, ws):
    c = make_cluster()
    group, tag = uid("grace"), uid("grace")
    p = c.start_worker(name=group, tags=tag, env={"SANDMILL_GRACE_S": "1"})
    c.wait_workers(group)
    with c.client() as api:
        jid = submit(api, ws, SLEEPER.format(s=6), tag)
        first = wait_running(api, ws, jid)["worker"]
        c.start_worker(name=group, tags=tag)
        c.wait_workers(group, count=2)
        t0 = time.time()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == 0
        assert time.time() - t0 < 5  # the grace period, not the job's 6 s
        j = wait_done(api, ws, jid, timeout=30)
    assert j["success"] is True and j["worker"] != first
    assert f"worker {first} shutting down; job put back in the queue" in j["logs"]
    assert j["logs"].count("started") == 2


# ---- 8. idle load -----------------------------------------------------------------------------

def test_idle_cluster_commits_fewer_than_5_transactions_per_second(pg_server, make_cluster, tmp_path):
    name = "sandmill_idle_" + uuid.uuid4().hex[:6]

    async def create() -> None:
        admin = await dbmod.connect(pg_server.get_uri())
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()

    asyncio.run(create())
    url = pg_server.get_uri(name)
    c = make_cluster(db_url=url)
    c.spawn("worker", "--profile", str(REPO / "profiles" / "default.yaml"))
    c.spawn("worker", "--profile", str(REPO / "profiles" / "native.yaml"))
    c.wait_workers("default")
    c.wait_workers("native")
    # Let start-up settle: PostgreSQL publishes an idle backend's pending counters up to
    # 10 s late, so the start-up burst would otherwise land inside the window.
    time.sleep(11)
    rate = asyncio.run(measure_commits_per_s(url, 10))
    print(f"idle load: {rate:.2f} committed transactions/s")
    assert rate < 5, f"{rate:.2f} tx/s while idle"
