"""A 30 s server outage under an agent loses no job and no result (issue 19): jobs running
when the server goes, jobs that end while it is away (their results wait in the agent's
outbox), a job that runs through the whole outage, and jobs still queued: each completes
exactly once after the server is back, none put back by the monitor, none restarted.

Why the monitor gives nothing away: it runs in the server, so it is down too; a fresh
server's monitor requeues nothing until it has reached the database for the ping timeout
in a row (``server.monitor.Settle``, 6 s), and within that the agent is back (its
requests retry with backoff of 2 s at most): the held completions land, the heartbeat of
the job still running is written again."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest

from agent_support import agent_token, push, start_agent, wait_agent
from support import wait_done

OUTAGE_S = 30


def _sleepy(s: float, out: str) -> str:
    return f"import time\ndef main():\n    time.sleep({s})\n    return {out!r}\n"


def _rows(url: str, ids: list[str]) -> list:
    async def q():
        conn = await asyncpg.connect(url)
        try:
            return await conn.fetch("SELECT id::text, worker, status, restarts FROM completed_job"
                                    " WHERE id = ANY($1::uuid[])", [uuid.UUID(i) for i in ids])
        finally:
            await conn.close()
    return asyncio.run(q())


def _all_running(c, ws: str, ids: list[str], timeout: float = 60) -> None:
    deadline = time.time() + timeout
    with c.client() as api:
        while time.time() < deadline:
            states = [api.get(f"/api/w/{ws}/jobs_u/get/{i}").json() for i in ids]
            if all(j.get("running") and j.get("started_at") for j in states):
                return
            time.sleep(0.1)
    raise AssertionError(f"not all running: {states}")


@pytest.mark.timeout(240)
def test_a_30s_server_outage_loses_no_job_and_no_result(make_cluster, ws):
    c = make_cluster(env={"SANDMILL_MONITOR_EVERY_S": "0.5"})  # an eager monitor; ping timeout 6 s
    tag = "out" + uuid.uuid4().hex[:8]
    token = agent_token(c, "outage", [tag])
    start_agent(c, token, "outage", [tag], subworkers=4)
    wait_agent(c, tag)
    ending = [push(c, ws, tag, _sleepy(3, f"ended-{i}")) for i in range(3)]  # end during the outage
    through = push(c, ws, tag, _sleepy(OUTAGE_S + 12, "through"))  # runs through it, ends after
    _all_running(c, ws, ending + [through])
    queued = [push(c, ws, tag, _sleepy(0, f"queued-{i}")) for i in range(3)]  # no slot free: wait

    server = c.procs[0]
    server.kill()
    server.wait()
    time.sleep(OUTAGE_S)
    outbox = c.tmp / "data" / "agent-outbox"
    assert list(outbox.rglob("*.json")), "the results of the jobs that ended are not kept on disk"
    c.start_server()

    with c.client() as api:
        done = {i: wait_done(api, ws, i, timeout=90) for i in ending + queued + [through]}
        logs = {i: api.get(f"/api/w/{ws}/jobs_u/get_logs/{i}").text for i in done}
    want = {**{i: f"ended-{n}" for n, i in enumerate(ending)}, through: "through",
            **{i: f"queued-{n}" for n, i in enumerate(queued)}}
    for i, j in done.items():
        assert j["success"] and j["result"] == want[i], j
        assert "stopped answering" not in logs[i], logs[i]
    rows = _rows(c.db_url, list(done))
    assert sorted(r["id"] for r in rows) == sorted(done), rows  # each once, none twice
    assert all(r["restarts"] == 0 and r["worker"].startswith("outage-") for r in rows), rows
    assert len({r["worker"] for r in rows}) == 1, rows  # the same agent did them all
    every_log = "".join(f.read_text(errors="replace") for f in c.tmp.glob("proc-*.log"))
    assert "stopped answering" not in every_log  # the monitor put nothing back
    deadline = time.time() + 10  # every result answered for: the outbox is empty again
    while list(outbox.rglob("*.json")) and time.time() < deadline:
        time.sleep(0.1)
    assert not list(outbox.rglob("*.json"))
