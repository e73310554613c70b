"""Agent workers on a real server: a job of the agent's tag completes through an agent
(a `sandmill worker --agent` process with no database URL); the token's tags bound every
pull whatever the request says; the profile must match the token; revocation stops pulls
within 5 s; expired, tampered and non-agent tokens are refused; an agent token is refused
on every route but the agent routes; results are idempotent and refused for jobs not held."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import httpx
import jwt

from agent_support import agent_name, agent_token, as_agent, push, start_agent, wait_agent
from support import REPO, TOKEN, wait_done


def _tag() -> str:
    return "edge" + uuid.uuid4().hex[:8]


def _job(c, ws: str, job_id: str) -> dict:
    with c.client() as api:
        return api.get(f"/api/w/{ws}/jobs_u/get/{job_id}").json()


def test_a_job_of_the_agents_tag_completes_through_an_agent(make_cluster, ws):
    c = make_cluster()
    tag = _tag()
    token = agent_token(c, "edge", [tag])
    start_agent(c, token, "edge", [tag], subworkers=2)
    wait_agent(c, tag)
    jid = push(c, ws, tag, "def main(x=3):\n    print('hello from the agent')\n    return x * 2\n")
    with c.client() as api:
        j = wait_done(api, ws, jid)
        assert j["success"] and j["result"] == 6, j
        assert j["worker"].startswith("edge-") and j["worker"].endswith("@" + _jti(token)[:12])
        assert "hello from the agent" in api.get(f"/api/w/{ws}/jobs_u/get_logs/{jid}").text
        w, = [w for w in api.get("/api/workers/list").json() if tag in w["tags"]]
        assert w["tags"] == [tag] and w["worker_group"] == "edge"
        # a burst through the agent's subworkers: each job once
        ids = [push(c, ws, tag, f"def main():\n    return {i}\n") for i in range(20)]
        assert [wait_done(api, ws, i)["result"] for i in ids] == list(range(20))


def _jti(token: str) -> str:
    return jwt.decode(token[len("jwt_agent_"):], options={"verify_signature": False})["jti"]


def test_a_job_of_another_tag_is_never_pulled_whatever_the_request_says(make_cluster, ws):
    c = make_cluster()
    mine, other = _tag(), _tag()
    token = agent_token(c, "edge", [mine])
    other_job = push(c, ws, other)
    name = agent_name(token)
    with as_agent(c, token) as a:
        # the worker registers as of its token's group and tags, or not at all
        r = a.post("/register", json={"name": name, "group": "edge", "tags": [other]})
        assert r.status_code == 403 and "tags" in r.json()["error"], r.text
        r = a.post("/register", json={"name": name, "group": "gpu", "tags": [mine]})
        assert r.status_code == 403 and "group" in r.json()["error"], r.text
        assert a.post("/register", json={"name": name, "group": "edge", "tags": [mine]}).status_code == 200
        for body in ({"n": 5}, {"n": 1}, {"n": 3, "tags": [other]}, {"n": 1, "tag": other},
                     {"n": 1, "worker_group": "x", "tags": [other, mine]}, {"n": 0, "ahead": 5},
                     {"n": 2, "ahead": 3, "ahead_after_s": 0}):
            r = a.post("/pull_job", json={"name": name, **body})
            assert r.status_code == 200 and r.json()["jobs"] == [], (body, r.text)
        r = a.post("/complete", json={"name": name, "want": 5, "ahead": 5, "tags": [other]})
        assert r.status_code == 200 and r.json()["jobs"] == []
        # another worker's name is not this token's
        r = a.post("/pull_job", json={"name": "default-host-1-abcd", "n": 1})
        assert r.status_code == 403 and "not of this agent token" in r.json()["error"]
    # nor does a running agent take it
    start_agent(c, token, "edge", [mine])
    wait_agent(c, mine)
    mine_job = push(c, ws, mine)
    with c.client() as api:
        assert wait_done(api, ws, mine_job)["success"]
    time.sleep(1)
    assert _job(c, ws, other_job)["type"] == "QueuedJob" and not _job(c, ws, other_job)["running"]


def test_the_profile_must_match_the_token(make_cluster, ws):
    c = make_cluster()
    tag = _tag()
    token = agent_token(c, "edge", [tag])
    wrong_group = start_agent(c, token, "other", [tag])
    wrong_tags = start_agent(c, token, "edge", [tag, "python3"])
    assert wrong_group.wait(30) == 2 and wrong_tags.wait(30) == 2
    logs = c.logs()
    assert "the agent token is for group 'edge'" in logs and "profile 'other'" in logs, logs
    no_token = start_agent(c, "", "edge", [tag])
    assert no_token.wait(30) == 2 and "set SANDMILL_AGENT_TOKEN" in c.logs()


def test_expired_tampered_and_other_tokens_are_refused(make_cluster):
    c = make_cluster()
    tag = _tag()
    token = agent_token(c, "edge", [tag])
    name = agent_name(token)
    with c.client() as api:  # an expiry in the past is refused at creation
        r = api.post("/api/agent_workers/create_agent_token",
                     json={"worker_group": "edge", "tags": [tag], "exp": int(time.time()) - 10})
        assert r.status_code == 422 and "past" in r.json()["error"]
        short = api.post("/api/agent_workers/create_agent_token",
                         json={"worker_group": "edge", "tags": [tag], "exp": int(time.time()) + 2}).text
    head, body, sig = token[len("jwt_agent_"):].split(".")
    claims = jwt.decode(token[len("jwt_agent_"):], options={"verify_signature": False})
    wider = jwt.api_jws.base64url_encode(
        jwt.utils.force_bytes(__import__("json").dumps({**claims, "tags": [tag, "python3"]}))).decode()
    forged = jwt.encode({**claims, "tags": ["python3"]}, "not-the-secret-" * 4, algorithm="HS256")
    time.sleep(3)
    cases = {
        f"jwt_agent_{head}.{wider}.{sig}": "invalid agent token",  # its tags widened, same signature
        "jwt_agent_" + forged: "invalid agent token",  # signed by another key
        short: "expired",
        TOKEN: "not the admin token",  # the admin token is no agent
        "smt_0123456789ab_" + "x" * 43: "not an agent token",
    }
    for tok, why in cases.items():
        with as_agent(c, tok) as a:
            r = a.post("/pull_job", json={"name": name, "n": 1})
            assert r.status_code in (401, 403) and why in r.json()["error"], (tok[:30], r.text)
    with as_agent(c, token) as a:
        assert a.post("/pull_job", json={"name": name, "n": 1}).status_code == 200
    with httpx.Client(base_url=c.base) as anon:
        r = anon.post("/api/agent_workers/pull_job", json={"name": name, "n": 1})
        assert r.status_code == 401 and "missing bearer token" in r.json()["error"]


def test_revocation_stops_pulls_within_5_s(make_cluster, ws):
    c = make_cluster()
    tag = _tag()
    p = subprocess.run([sys.executable, "-m", "sandmill", "agent-token", "create", "--url", c.base,
                        "--group", "edge", "--tags", tag, "--expires", "1h"],
                       env={**c.env}, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0 and "agent token for group edge" in p.stderr, p.stderr
    token = p.stdout.strip()
    claims = jwt.decode(token[len("jwt_agent_"):], options={"verify_signature": False})
    assert claims["worker_group"] == "edge" and claims["tags"] == [tag] and 3500 < claims["exp"] - time.time() <= 3600
    agent = start_agent(c, token, "edge", [tag])
    wait_agent(c, tag)
    with c.client() as api:
        assert wait_done(api, ws, push(c, ws, tag))["success"]
    # revoked with the CLI, as an admin would
    p = subprocess.run([sys.executable, "-m", "sandmill", "agent-token", "revoke", "--url", c.base, token],
                       env={**c.env}, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert p.returncode == 0 and "revoked" in p.stdout, p.stderr
    t0 = time.monotonic()
    with as_agent(c, token) as a:
        while a.post("/pull_job", json={"name": agent_name(token), "n": 1}).status_code != 403:
            assert time.monotonic() - t0 < 5, "the revoked token still pulls"
            time.sleep(0.1)
    late = push(c, ws, tag)
    assert agent.wait(timeout=30) == 4  # the agent learns it within its long poll and stops
    assert "refused this agent" in c.logs()
    time.sleep(1)
    assert _job(c, ws, late)["type"] == "QueuedJob"  # nobody took it
    with c.client() as api:  # revoking a token that is no agent token says so
        r = api.post("/api/agent_workers/blacklist_token", json={"token": "nope"})
        assert r.status_code == 401 and "not an agent token" in r.json()["error"]


def test_token_management_is_the_admins(make_cluster):
    c = make_cluster()
    token = agent_token(c, "edge", [_tag()])
    for tok in (token, "smt_0123456789ab_" + "x" * 43):
        with httpx.Client(base_url=c.base, headers={"Authorization": f"Bearer {tok}"}) as x:
            r = x.post("/api/agent_workers/create_agent_token",
                       json={"worker_group": "edge", "tags": ["python3"], "exp": int(time.time()) + 99})
            assert r.status_code in (401, 403), r.text
            assert x.post("/api/agent_workers/blacklist_token", json={"token": token}).status_code in (401, 403)
    with c.client() as api:
        for bad in ({"worker_group": "Bad Group", "tags": ["a"], "exp": 2**31},
                    {"worker_group": "edge", "tags": [], "exp": 2**31},
                    {"worker_group": "edge", "tags": ["a\u0000"], "exp": 2**31}):
            r = api.post("/api/agent_workers/create_agent_token", json=bad)
            assert r.status_code == 422 and r.json()["error"], r.text


def _routes(app) -> list[tuple[str, str]]:
    out = []

    def walk(routes):
        for r in routes:
            if hasattr(r, "methods") and hasattr(r, "path"):
                out.extend((m, r.path) for m in sorted(r.methods - {"HEAD"}))
            inner = getattr(r, "original_router", None)  # an included router (FastAPI >= 0.16x)
            if inner is not None:
                walk(inner.routes)
    walk(app.routes)
    return sorted(set(out))


def test_an_agent_token_is_refused_on_every_other_route(make_cluster):
    from sandmill.server.app import create_app
    from sandmill.server.settings import ServerSettings

    c = make_cluster()
    token = agent_token(c, "edge", ["python3"])
    routes = _routes(create_app(ServerSettings(database_url="postgresql://unused", admin_token="x")))
    assert ("POST", "/api/agent_workers/pull_job") in routes and len(routes) > 20
    checked = 0
    with httpx.Client(base_url=c.base, timeout=30) as x:
        for method, path in routes:
            if path.startswith("/api/agent_workers/"):
                continue
            url = path.replace("{path:path}", "f/x").replace("{", "").replace("}", "")
            anon = x.request(method, url, json={})
            if anon.status_code != 401:  # open to all (health, docs, the dashboard's page)
                continue
            r = x.request(method, url, json={}, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code in (401, 403), (method, path, r.status_code, r.text)
            checked += 1
    assert checked > 20


def test_a_result_completes_a_job_once_and_is_refused_for_a_job_not_held(make_cluster, ws):
    c = make_cluster()
    tag = _tag()
    token = agent_token(c, "edge", [tag])
    name = agent_name(token)
    held, other = push(c, ws, tag), push(c, ws, tag, "def main():\n    return 'other'\n")
    with as_agent(c, token) as a:
        assert a.post("/register", json={"name": name, "group": "edge", "tags": [tag]}).status_code == 200
        key = {"Idempotency-Key": uuid.uuid4().hex}
        r = a.post("/pull_job", json={"name": name, "n": 1}, headers=key)
        jobs = r.json()["jobs"]
        assert [j["id"] for j in jobs] == [held]
        # the same request again (its answer lost): the same answer, no second claim
        assert a.post("/pull_job", json={"name": name, "n": 1}, headers=key).json() == r.json()
        assert _job(c, ws, other)["running"] is False
        done = {"name": name, "status": "success", "result": {"v": 1}, "duration_ms": 5}
        r1 = a.post(f"/send_result/{held}", json=done)
        assert r1.status_code == 200 and r1.json()["status"] == "success" and not r1.json()["again"]
        r2 = a.post(f"/send_result/{held}", json={**done, "result": {"v": 2}})
        assert r2.status_code == 200 and r2.json()["again"], r2.text
        # not held: refused (queued, not claimed by this worker)
        r3 = a.post(f"/send_result/{other}", json=done)
        assert r3.status_code == 409 and "not held" in r3.json()["error"]
        r4 = a.post("/complete", json={"name": name, "done": [{"id": held, **done}, {"id": other, **done}]})
        assert r4.status_code == 200 and r4.json()["acked"] == [held] and r4.json()["refused"] == [other]
        # nor can it write another job's logs or heartbeat it
        assert a.post("/append_logs", json={"name": name, "job_id": other, "chunks": ["x\n"]}).json() == {"ok": False}
        assert a.post("/ping_job", json={"name": name, "job_id": other}).json() == {"state": "lost"}
    with c.client() as api:
        j = wait_done(api, ws, held)
        assert j["result"] == {"v": 1} and j["worker"] == name
        assert _job(c, ws, other)["type"] == "QueuedJob"


def test_a_pull_with_wait_s_is_a_long_poll_that_claims_on_the_notify(make_cluster, ws):
    import threading

    c = make_cluster()
    tag = _tag()
    token = agent_token(c, "edge", [tag])
    name = agent_name(token)
    with as_agent(c, token) as a:
        assert a.post("/register", json={"name": name, "group": "edge", "tags": [tag]}).status_code == 200
        r = a.post("/pull_job", json={"name": name, "n": 1})  # nothing due: remembered as such
        assert r.json() == {"jobs": [], "idle": {"due": None}}
        pushed: list[str] = []
        t = threading.Timer(1.0, lambda: pushed.append(push(c, ws, tag)))
        t.start()
        t0 = time.monotonic()
        r = a.post("/pull_job", json={"name": name, "n": 1, "wait_s": 20})
        took = time.monotonic() - t0
        t.join()
        assert [j["id"] for j in r.json()["jobs"]] == pushed and 0.9 < took < 10, (took, r.text)
        t0 = time.monotonic()  # and one that times out empty
        assert a.post("/pull_job", json={"name": name, "n": 1, "wait_s": 1}).json()["jobs"] == []
        assert 0.9 < time.monotonic() - t0 < 10


def _completed_with_tag(url: str, tag: str, timeout: float = 30) -> str:
    import asyncio

    import asyncpg

    async def q() -> str:
        conn = await asyncpg.connect(url)
        try:
            deadline = time.time() + timeout
            while (jid := await conn.fetchval("SELECT id::text FROM completed_job WHERE tag = $1", tag)) is None:
                assert time.time() < deadline, f"no completed job of tag {tag}"
                await asyncio.sleep(0.1)
            return jid
        finally:
            await conn.close()
    return asyncio.run(q())


def test_an_agent_runs_its_init_script_and_kills_a_canceled_job(make_cluster, ws):
    c = make_cluster()
    tag = _tag()
    token = agent_token(c, "edge", [tag])
    start_agent(c, token, "edge", [tag], profile_text=(
        f"name: edge\ntags: [{tag}]\nbackend: {{kind: process}}\nsubworkers: 1\n"
        "limits: {wall_s: 60, memory_mb: 512, pids: 128}\ninit_script: echo agent-init-ran\n"))
    name = wait_agent(c, tag)
    with c.client() as api:
        init = _completed_with_tag(c.db_url, f"init-{name}")  # recorded just after it registered
        j = api.get(f"/api/w/admins/jobs_u/get/{init}").json()
        assert j["success"] and j["worker"] == name, j
        assert "agent-init-ran" in api.get(f"/api/w/admins/jobs_u/get_logs/{init}").text
        jid = push(c, ws, tag, "import time\ndef main():\n    time.sleep(30)\n")
        deadline = time.time() + 30
        while not _job(c, ws, jid).get("running"):
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.5)
        t0 = time.monotonic()
        assert api.post(f"/api/w/{ws}/jobs_u/queue/cancel/{jid}", json={"reason": "enough"}).status_code == 200
        j = wait_done(api, ws, jid, timeout=20)
        assert not j["success"] and j["canceled"] and time.monotonic() - t0 < 5, j
