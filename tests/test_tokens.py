"""Workspace tokens on a real cluster: what a token for workspace A may do in A, what it
gets elsewhere (404 as if nothing were there; 403 for the admin's routes and for a scope it
lacks), revocation and expiry (401 at once), storage (hashed), whoami, and the CLI."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import subprocess
import sys
import time
import uuid

import asyncpg
import httpx

from support import REPO, TOKEN, wait_done


def make_token(api: httpx.Client, ws: str, **body) -> str:
    r = api.post("/api/users/tokens/create", json={"workspace_id": ws, **body})
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


def as_token(cluster, token: str) -> httpx.Client:
    return httpx.Client(base_url=cluster.base, headers={"Authorization": f"Bearer {token}"}, timeout=60)


def preview(c: httpx.Client, ws: str, code: str = "def main():\n    return 7\n") -> httpx.Response:
    return c.post(f"/api/w/{ws}/jobs/run/preview", json={"content": code, "language": "python3"})


def test_a_token_runs_and_reads_jobs_in_its_workspace(cluster, api, ws):
    tok = make_token(api, ws, label="ci-bot")
    prefix = tok.split("_")[1]
    with as_token(cluster, tok) as c:
        r = preview(c, ws, "def main():\n    print('hi from A')\n    return 7\n")
        assert r.status_code == 201, r.text
        jid = r.text
        j = wait_done(c, ws, jid)
        assert j["success"] and j["result"] == 7
        assert j["created_by"] == f"ci-bot/{prefix}"  # who pushed it: the token, not "admin"
        assert c.get(f"/api/w/{ws}/jobs_u/completed/get_result/{jid}").json() == 7
        assert c.get(f"/api/w/{ws}/jobs_u/completed/get_result_maybe/{jid}").json()["success"]
        assert "hi from A" in c.get(f"/api/w/{ws}/jobs_u/get_logs/{jid}").text
        assert [x["id"] for x in c.get(f"/api/w/{ws}/jobs/list").json()] == [jid]
        r = c.post(f"/api/w/{ws}/jobs/run_wait_result/preview",
                   json={"content": "def main(x):\n    return x * 2\n", "language": "python3",
                         "args": {"x": 4}})
        assert r.status_code == 200 and r.json() == 8
        assert c.post(f"/api/w/{ws}/scripts/create", json={
            "path": "f/a", "content": "def main():\n    return 'a'\n", "language": "python3"}).status_code == 201
        r = c.post(f"/api/w/{ws}/jobs/run_wait_result/p/f/a", json={})
        assert r.status_code == 200 and r.json() == "a"
        assert c.get("/api/version").status_code == 200


def test_a_token_on_another_workspace_gets_the_404_of_a_missing_thing(cluster, api, ws):
    other = ws + "b"
    # workspace B has a job and a script (the admin made them)
    jid = preview(api, other).text
    wait_done(api, other, jid)
    assert api.post(f"/api/w/{other}/scripts/create", json={
        "path": "f/secret", "content": "def main():\n    return 1\n", "language": "python3"}).status_code == 201
    h = api.get(f"/api/w/{other}/scripts/get/p/f/secret").json()["hash"]
    missing = str(uuid.uuid4())
    with as_token(cluster, make_token(api, ws)) as c:
        for path in ("jobs_u/get/{}", "jobs_u/completed/get_result/{}",
                     "jobs_u/completed/get_result_maybe/{}", "jobs_u/get_logs/{}",
                     "jobs_u/getupdate/{}"):
            real, fake = c.get(f"/api/w/{other}/" + path.format(jid)), c.get(f"/api/w/{other}/" + path.format(missing))
            assert real.status_code == fake.status_code == 404, (path, real.text)
            # word for word what a job that does not exist gets (but its id)
            assert real.json() == {"error": fake.json()["error"].replace(missing, jid)}
        r = c.post(f"/api/w/{other}/jobs_u/queue/cancel/{jid}")
        assert r.status_code == 404 and r.json()["error"] == f"queued or running job {jid} not found in workspace {other}"
        for real, fake in (("scripts/get/p/f/secret", "scripts/get/p/f/nothing"),
                           (f"scripts/get/h/{h}", "scripts/get/h/0000")):
            a, b = c.get(f"/api/w/{other}/{real}"), c.get(f"/api/w/{other}/{fake}")
            assert a.status_code == b.status_code == 404
            assert a.json()["error"].replace("f/secret", "f/nothing").replace(h, "0000") == b.json()["error"]
        r = c.post(f"/api/w/{other}/jobs/run_wait_result/p/f/secret", json={})
        assert r.status_code == 404 and r.json() == {"error": f"script f/secret not found in workspace {other}"}
        # writes and lists of B: the same 404 for any workspace not the token's
        for r in (preview(c, other), c.get(f"/api/w/{other}/jobs/list"),
                  c.get(f"/api/w/{other}/scripts/list"),
                  c.post(f"/api/w/{other}/scripts/create", json={
                      "path": "f/x", "content": "def main():\n    return 1\n", "language": "python3"})):
            assert r.status_code == 404 and r.json() == {"error": f"workspace {other} not found"}, r.text
    # nothing of it reached B
    assert [x["id"] for x in api.get(f"/api/w/{other}/jobs/list").json()] == [jid]
    assert [s["path"] for s in api.get(f"/api/w/{other}/scripts/list").json()] == ["f/secret"]


def test_a_token_cannot_touch_the_admins_routes(cluster, api, ws):
    with as_token(cluster, make_token(api, ws)) as c:
        for r in (c.get("/api/configs/worker__x"), c.put("/api/configs/worker__x", json={"tags": ["a"]}),
                  c.get("/api/workers/list"), c.get("/metrics"),
                  c.post("/api/users/tokens/create", json={"workspace_id": ws}),
                  c.get("/api/users/tokens/list"), c.delete("/api/users/tokens/delete/abc")):
            assert r.status_code == 403, (r.request.url, r.text)
            assert "needs the admin token" in r.json()["error"] and ws in r.json()["error"]
    assert api.get("/api/configs/worker__x").status_code == 404  # the PUT did not land


def test_a_missing_scope_is_403_naming_it(cluster, api, ws):
    jid = preview(api, ws).text
    wait_done(api, ws, jid)
    with as_token(cluster, make_token(api, ws, label="reader", scopes=["jobs:read"])) as c:
        assert c.get(f"/api/w/{ws}/jobs_u/get/{jid}").status_code == 200
        for r, scope in ((preview(c, ws), "jobs:run"),
                         (c.post(f"/api/w/{ws}/jobs_u/queue/cancel/{jid}"), "jobs:cancel"),
                         (c.get(f"/api/w/{ws}/scripts/list"), "scripts:read"),
                         (c.post(f"/api/w/{ws}/scripts/create", json={
                             "path": "f/x", "content": "def main():\n    return 1\n",
                             "language": "python3"}), "scripts:write")):
            assert r.status_code == 403, r.text
            assert f"lacks the scope '{scope}'" in r.json()["error"] and "'reader'" in r.json()["error"]
    r = api.post("/api/users/tokens/create", json={"workspace_id": ws, "scopes": ["jobs:read", "root"]})
    assert r.status_code == 422 and "'root'" in r.json()["error"] and "scopes" in r.json()["error"]


def test_revoked_is_refused_at_once(cluster, api, ws):
    tok = make_token(api, ws, label="soon-gone")
    prefix = tok.split("_")[1]
    with as_token(cluster, tok) as c:
        assert c.get(f"/api/w/{ws}/jobs/list").status_code == 200
        r = api.delete(f"/api/users/tokens/delete/{prefix}")
        assert r.status_code == 200 and prefix in r.text
        r = c.get(f"/api/w/{ws}/jobs/list")  # the very next request
        assert r.status_code == 401 and "invalid token" in r.json()["error"]
    assert api.delete(f"/api/users/tokens/delete/{prefix}").status_code == 404
    assert prefix not in [t["prefix"] for t in api.get("/api/users/tokens/list").json()]


def test_expired_is_401_with_a_message(cluster, api, ws):
    until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=2)
    tok = make_token(api, ws, label="short", expiration=until.isoformat())
    with as_token(cluster, tok) as c:
        assert c.get(f"/api/w/{ws}/jobs/list").status_code == 200
        time.sleep(max(0.0, (until - dt.datetime.now(dt.timezone.utc)).total_seconds()) + 0.3)
        r = c.get(f"/api/w/{ws}/jobs/list")
        assert r.status_code == 401 and "'short'" in r.json()["error"] and "expired" in r.json()["error"]
    listed = [t for t in api.get("/api/users/tokens/list", params={"workspace_id": ws}).json()]
    assert [t["expired"] for t in listed] == [True]
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=1)).isoformat()
    r = api.post("/api/users/tokens/create", json={"workspace_id": ws, "expiration": past})
    assert r.status_code == 422 and "expiration" in r.json()["error"] and "past" in r.json()["error"]
    r = api.post("/api/users/tokens/create", json={"workspace_id": ws, "expiration": "2999-01-01T00:00:00"})
    assert r.status_code == 422 and "expiration" in r.json()["error"]  # no time zone


def test_tokens_are_stored_hashed_and_listed_without_secret(cluster, api, ws, pg_url):
    tok = make_token(api, ws, label="hashed", scopes=["jobs:read"])
    prefix, secret = tok.split("_")[1], tok.split("_", 2)[2]

    async def rows() -> list[dict]:
        conn = await asyncpg.connect(pg_url)
        try:
            return [dict(r) for r in await conn.fetch("SELECT * FROM token WHERE prefix = $1", prefix)]
        finally:
            await conn.close()

    (row,) = asyncio.run(rows())
    stored = repr(row)
    assert secret not in stored and tok not in stored
    assert row["token_hash"] == __import__("hashlib").sha256(tok.encode()).digest()
    listed = api.get("/api/users/tokens/list", params={"workspace_id": ws})
    assert secret not in listed.text
    (t,) = listed.json()
    assert (t["prefix"], t["label"], t["workspace_id"], t["scopes"], t["expiration"]) == \
        (prefix, "hashed", ws, ["jobs:read"], None)
    with as_token(cluster, tok) as c:
        c.get(f"/api/w/{ws}/jobs/list")
    (t,) = api.get("/api/users/tokens/list", params={"workspace_id": ws}).json()
    assert t["last_used_at"] is not None


def test_whoami(cluster, api, ws):
    me = api.get("/api/users/whoami").json()
    assert me["is_admin"] and me["username"] == "admin" and me["workspace_id"] is None
    tok = make_token(api, ws, label="me", scopes=["jobs:run", "jobs:read"])
    with as_token(cluster, tok) as c:
        me = c.get("/api/users/whoami").json()
    assert me == {"is_admin": False, "username": f"me/{tok.split('_')[1]}", "label": "me",
                  "prefix": tok.split("_")[1], "workspace_id": ws, "scopes": ["jobs:run", "jobs:read"],
                  "expiration": None}
    r = httpx.get(cluster.base + "/api/users/whoami", headers={"Authorization": "Bearer smt_000000000000_" + "x" * 43})
    assert r.status_code == 401 and "invalid token" in r.json()["error"]


def test_cli_create_list_revoke(cluster, ws):
    env = {**os.environ, "SANDMILL_URL": cluster.base, "SANDMILL_TOKEN": TOKEN}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sandmill", "tokens", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60)

    p = cli("create", "--workspace", ws, "--scopes", "jobs:read,scripts:read", "--expires", "30d",
            "--label", "from-cli")
    assert p.returncode == 0, p.stderr
    tok = p.stdout.strip()
    prefix = tok.split("_")[1]
    with httpx.Client(base_url=cluster.base, headers={"Authorization": f"Bearer {tok}"}) as c:
        me = c.get("/api/users/whoami").json()
    assert me["scopes"] == ["jobs:read", "scripts:read"] and me["workspace_id"] == ws
    left = dt.datetime.fromisoformat(me["expiration"]) - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=29) < left <= dt.timedelta(days=30)
    p = cli("list", "--workspace", ws)
    assert p.returncode == 0 and prefix in p.stdout and "from-cli" in p.stdout and tok not in p.stdout
    p = cli("revoke", prefix)
    assert p.returncode == 0 and prefix in p.stdout
    p = cli("revoke", prefix)
    assert p.returncode == 1 and "404" in p.stderr
    p = cli("create", "--workspace", ws, "--expires", "soon")
    assert p.returncode == 2 and "--expires 'soon'" in p.stderr
    p = cli("create", "--workspace", ws, "--scopes", "jobs:fly")
    assert p.returncode == 1 and "jobs:fly" in p.stderr
