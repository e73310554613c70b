"""Agent workers through faults, with real processes: the server killed and started again
while an agent runs a job (its result arrives, the job completes once, no restart
counted); an agent SIGKILLed mid-job (the monitor puts the job back, another agent
completes it); results an agent process could not deliver, sent by the next one."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid

import asyncpg

from agent_support import agent_name, agent_token, as_agent, push, start_agent, wait_agent
from support import wait_done

SLEEPY = "import time\ndef main(s=3):\n    time.sleep(s)\n    return 'slept'\n"


def _tag() -> str:
    return "edge" + uuid.uuid4().hex[:8]


def _running(c, ws: str, job_id: str, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    with c.client() as api:
        while time.time() < deadline:
            j = api.get(f"/api/w/{ws}/jobs_u/get/{job_id}").json()
            if j.get("running"):
                return j
            time.sleep(0.05)
    raise AssertionError(f"job {job_id} never ran: {j}")


def _completed_rows(url: str, job_id: str) -> list:
    async def q():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch("SELECT worker, status, restarts FROM completed_job WHERE id = $1",
                                    uuid.UUID(job_id))
        finally:
            await conn.close()
    return asyncio.run(q())


def test_server_killed_and_restarted_mid_job_the_result_arrives_once(make_cluster, ws):
    c = make_cluster()
    tag = _tag()
    token = agent_token(c, "edge", [tag])
    start_agent(c, token, "edge", [tag], subworkers=2)
    wait_agent(c, tag)
    jid = push(c, ws, tag, SLEEPY)
    _running(c, ws, jid)
    server = c.procs[0]
    server.kill()  # mid-job: heartbeats, logs and the completion meet a dead server
    server.wait()
    time.sleep(4)  # the job ends while no server answers: its result waits in the outbox
    assert list((c.tmp / "data" / "agent-outbox").rglob("*.json")), "the result is not kept on disk"
    c.start_server()
    with c.client() as api:
        j = wait_done(api, ws, jid, timeout=60)
    assert j["success"] and j["result"] == "slept", j
    rows = _completed_rows(c.db_url, jid)
    assert len(rows) == 1 and rows[0]["restarts"] == 0 and rows[0]["worker"].startswith("edge-"), rows
    deadline = time.time() + 10  # delivered: the outbox is empty again
    while list((c.tmp / "data" / "agent-outbox").rglob("*.json")) and time.time() < deadline:
        time.sleep(0.1)
    assert not list((c.tmp / "data" / "agent-outbox").rglob("*.json"))
    with c.client() as api:  # and the agent goes on taking jobs
        assert wait_done(api, ws, push(c, ws, tag))["success"]


def test_agent_sigkilled_its_job_is_requeued_and_completed_elsewhere(make_cluster, ws):
    c = make_cluster(env={"SANDMILL_PING_TIMEOUT_S": "3", "SANDMILL_MONITOR_EVERY_S": "0.5"})
    tag = _tag()
    token = agent_token(c, "edge", [tag])
    first = start_agent(c, token, "edge", [tag])
    wait_agent(c, tag)
    jid = push(c, ws, tag, SLEEPY.replace("s=3", "s=2"))
    ran_on = _running(c, ws, jid)["worker"]
    time.sleep(1.5)  # its heartbeats (every second) have reached the server
    first.send_signal(signal.SIGKILL)
    first.wait()
    start_agent(c, token, "edge", [tag])
    with c.client() as api:
        j = wait_done(api, ws, jid, timeout=60)
        assert j["success"] and j["result"] == "slept", j
        assert j["worker"] != ran_on and j["worker"].endswith(ran_on[ran_on.index("@"):])
        assert "stopped answering; job put back in the queue" in api.get(
            f"/api/w/{ws}/jobs_u/get_logs/{jid}").text
    rows = _completed_rows(c.db_url, jid)
    assert len(rows) == 1 and rows[0]["restarts"] == 1, rows


def test_a_result_left_by_a_dead_agent_is_sent_by_the_next(make_cluster, ws):
    """An agent process killed after its job ended but before the server acknowledged the
    result: the next agent process on the same data dir sends it (the job is still held by
    the dead one's name, within the ping timeout)."""
    c = make_cluster()
    tag = _tag()
    token = agent_token(c, "edge", [tag])
    name = agent_name(token, "dead-host-1-abcd")
    jid = push(c, ws, tag)
    with as_agent(c, token) as a:
        assert a.post("/register", json={"name": name, "group": "edge", "tags": [tag]}).status_code == 200
        assert [j["id"] for j in a.post("/pull_job", json={"name": name, "n": 1}).json()["jobs"]] == [jid]
    box = c.tmp / "data" / "agent-outbox" / name
    box.mkdir(parents=True)
    (box / "batch.json").write_text(json.dumps({"worker": name, "pid": 999999999, "done": [
        {"id": jid, "status": "success", "result": "from the outbox", "error": None, "duration_ms": 1,
         "cpu_ms": 0, "mem_peak_kb": 0, "outcome": None, "started_at": None}]}))
    start_agent(c, token, "edge", [tag])
    with c.client() as api:
        j = wait_done(api, ws, jid)
    assert j["result"] == "from the outbox" and j["worker"] == name
    assert not (box / "batch.json").exists()
