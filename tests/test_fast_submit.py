"""The fast path of POST /api/w/{ws}/jobs/run/preview (server/fast_submit.py): the plain
request is answered without FastAPI's machinery, and every request gets the very answer
the route gives (compared with a server that has the fast path off)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx

from sandmill.server import fast_submit
from sandmill.server.app import _db, _http, create_app
from sandmill.server.settings import ServerSettings
from support import TOKEN

BASH = {"content": "echo 1\n", "language": "bash"}


def test_the_plain_submit_is_answered_by_the_fast_path_as_the_route_answers(pg_url, tmp_path):
    ws = "ws" + uuid.uuid4().hex[:8]
    app = create_app(ServerSettings(database_url=pg_url, data_dir=tmp_path, admin_token=TOKEN))

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t",
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as c:
                before = fast_submit.answered
                r = await c.post(f"/api/w/{ws}/jobs/run/preview", json={**BASH, "args": {"a": [1]}})
                taken = fast_submit.answered - before
                r2 = await c.post(f"/api/w/{ws}/jobs/run/preview", json=BASH, params={"tag": "x"})
                taken2 = fast_submit.answered - before - taken
                # queued, or already run by a worker of another test on this database
                row = await app.state.pool.fetchrow(
                    "SELECT workspace, kind, tag, args, created_by FROM queue WHERE id = $1"
                    " UNION ALL SELECT workspace, kind, tag, args, created_by FROM completed_job"
                    " WHERE id = $1", uuid.UUID(r.text))
                return r, taken, r2, taken2, row

    r, taken, r2, taken2, row = asyncio.run(go())
    assert r.status_code == 201 and taken == 1
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert (row["workspace"], row["kind"], row["tag"], row["args"], row["created_by"]) == (
        ws, "preview", "bash", {"a": [1]}, "admin")
    assert r2.status_code == 201 and taken2 == 0  # a query parameter: the route's own way


def test_the_waiting_routes_answer_the_result_a_failure_and_a_timeout(cluster, pg_url, tmp_path):
    """run_wait_result/preview and run_inline/preview on the fast path (the session
    cluster's workers run the jobs): 200 with the result, 400 with the error, 408 past the
    wait, each with the job id header, as the route answers."""
    ws = "ws" + uuid.uuid4().hex[:8]
    app = create_app(ServerSettings(database_url=pg_url, data_dir=tmp_path, admin_token=TOKEN,
                                    wait_timeout_s=3))

    async def go():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60,
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as c:
                before = fast_submit.answered
                ok = await c.post(f"/api/w/{ws}/jobs/run_wait_result/preview", json={
                    "content": "def main(x):\n    return {'x': x}\n", "language": "python3", "args": {"x": 2}})
                bad = await c.post(f"/api/w/{ws}/jobs/run_inline/preview", json={
                    "content": "def main():\n    raise ValueError('no')\n", "language": "python3"})
                late = await c.post(f"/api/w/{ws}/jobs/run_wait_result/preview",
                                    json={"content": "sleep 6\n", "language": "bash"})
                return ok, bad, late, fast_submit.answered - before

    ok, bad, late, taken = asyncio.run(go())
    assert taken == 3
    assert ok.status_code == 200 and ok.json() == {"x": 2} and uuid.UUID(ok.headers["x-sandmill-job-id"])
    assert bad.status_code == 400 and "no" in bad.text and bad.headers["x-sandmill-job-id"]
    assert late.status_code == 408 and "did not complete within 3 s" in late.json()["error"]
    assert late.headers["x-sandmill-job-id"]


def _token(c: httpx.Client, ws: str, **body) -> str:
    r = c.post("/api/users/tokens/create", json={"workspace_id": ws, **body})
    assert r.status_code == 201, r.text
    return r.text


def test_every_other_request_gets_the_routes_own_answer(make_cluster):
    fast, slow = make_cluster(), make_cluster(env={"SANDMILL_FAST_SUBMIT": "0"})
    ws = "ws" + uuid.uuid4().hex[:8]
    with fast.client() as admin:
        mine, other = _token(admin, ws), _token(admin, "elsewhere" + ws)
        reader = _token(admin, ws, scopes=["jobs:read"])
    path = f"/api/w/{ws}/jobs/run/preview"
    json_h = {"content-type": "application/json"}
    cases = [
        ("no token", {"json": BASH}, None),
        ("bad token", {"json": BASH}, "nope"),
        ("another workspace's token", {"json": BASH}, other),
        ("a token without jobs:run", {"json": BASH}, reader),
        ("not JSON", {"content": b"{nope", "headers": json_h}, TOKEN),
        ("not UTF-8", {"content": b'{"content": "\xff"}', "headers": json_h}, TOKEN),
        ("a list", {"json": [1]}, TOKEN),
        ("no language", {"json": {"content": "x"}}, TOKEN),
        ("unknown language", {"json": {"content": "x", "language": "cobol"}}, TOKEN),
        ("python without main", {"json": {"content": "x = 1\n", "language": "python3"}}, TOKEN),
        ("a NUL in the content", {"json": {"content": "echo \x00", "language": "bash"}}, TOKEN),
        ("args not an object", {"json": {**BASH, "args": [1]}}, TOKEN),
        ("a bad tag template", {"json": {**BASH, "tag": "$args[nope]"}}, TOKEN),
        ("text/plain", {"content": b'{"content": "echo", "language": "bash"}',
                        "headers": {"content-type": "text/plain"}}, TOKEN),
        ("a bad query parameter", {"json": BASH, "params": {"priority": "0"}}, TOKEN),
        ("empty body", {"content": b"", "headers": json_h}, TOKEN),
    ]
    for name, kw, token in [(f"{n} ({p})", k, t) for p in ("run", "run_wait_result") for n, k, t in cases]:
        path = f"/api/w/{ws}/jobs/{name.rpartition('(')[2][:-1]}/preview"
        answers = []
        for cl in (fast, slow):
            headers = {**kw.get("headers", {})}
            if token:
                headers["Authorization"] = f"Bearer {token}"
            with httpx.Client(base_url=cl.base, timeout=30) as c:
                r = c.post(path, **{**kw, "headers": headers})
            answers.append((r.status_code, r.headers.get("content-type"), r.text))
        assert answers[0] == answers[1], f"{name}: fast {answers[0]} != route {answers[1]}"
        assert 400 <= answers[0][0] < 500, (name, answers[0])
    # and the plain case, with a workspace token: 201 and the job recorded as the token's
    path = f"/api/w/{ws}/jobs/run/preview"
    for cl in (fast, slow):
        with httpx.Client(base_url=cl.base, headers={"Authorization": f"Bearer {mine}"}) as c:
            r = c.post(path, json=BASH)
            assert r.status_code == 201 and r.headers["content-type"] == "text/plain; charset=utf-8"
            got = c.get(f"/api/w/{ws}/jobs_u/get/{r.text}").json()
            assert got["created_by"] != "admin" and "/" in got["created_by"], got  # the token's


def test_an_insert_fault_is_answered_by_the_apps_handler():
    app = create_app(ServerSettings(database_url="postgresql://x", admin_token=TOKEN))
    assert fast_submit._handler_for(app, asyncpg.InterfaceError("down")) is _db
    assert fast_submit._handler_for(app, asyncpg.exceptions.DataError("bad")) is _db
    assert fast_submit._handler_for(app, RuntimeError("bug")) is None  # a 500, as on the route
    from fastapi import HTTPException
    assert fast_submit._handler_for(app, HTTPException(400, "x")) is _http
