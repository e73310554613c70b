"""The dashboard's JSON API and its static files: keyset paging of completed jobs with
filters, the overview's queue per tag, the workers' running jobs and init runs, the page
and its assets served from the package."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx

from support import wait_done
from sandmill.store import db as dbmod


def seed_completed(pg_url: str, ws: str, n: int) -> None:
    async def go() -> None:
        conn = await dbmod.connect(pg_url)
        try:
            await conn.execute(
                "INSERT INTO completed_job (id, workspace, kind, script_path, language, tag, created_at,"
                " scheduled_for, started_at, completed_at, status)"
                " SELECT gen_random_uuid(), $1, 'script', 'f/p' || (i % 2), 'python3', 't' || (i % 3),"
                " now() - interval '1 day', now() - interval '1 day', now() - interval '1 day',"
                # every 5th pair shares a completed_at: the cursor's id breaks the tie
                " now() - (i / 2) * interval '1 second',"
                " CASE WHEN i % 4 = 0 THEN 'failure' ELSE 'success' END FROM generate_series(1, $2) i", ws, n)
        finally:
            await conn.close()
    asyncio.run(go())


def page_all(api: httpx.Client, **params) -> list[dict]:
    seen, cursor = [], None
    while True:
        r = api.get("/api/dashboard/jobs", params={**params, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        body = r.json()
        seen += body["jobs"]
        cursor = body["next"]
        if not cursor:
            return seen


def test_completed_jobs_page_by_keyset_with_filters(api, pg_url, ws):
    seed_completed(pg_url, ws, 53)
    jobs = page_all(api, workspace=ws, state="completed", limit=7)
    assert len(jobs) == 53 and len({j["id"] for j in jobs}) == 53
    keys = [(j["completed_at"], j["id"]) for j in jobs]
    assert keys == sorted(keys, reverse=True)
    failures = page_all(api, workspace=ws, state="failure", limit=5)
    assert len(failures) == 13 and {j["state"] for j in failures} == {"failure"}
    one = page_all(api, workspace=ws, state="all", script="f/p1", tag="t1", limit=50)
    assert {(j["script_path"], j["tag"]) for j in one} == {("f/p1", "t1")} and len(one) == 9
    r = api.get("/api/dashboard/jobs", params={"cursor": "not-a-cursor"})
    assert r.status_code == 400 and "bad cursor" in r.json()["error"]
    r = api.get("/api/dashboard/jobs", params={"state": "nonsense"})
    assert r.status_code == 422 and "state" in r.json()["error"]


def test_the_overview_counts_waiting_jobs_per_tag(api, ws):
    tag = f"nobody-{uuid.uuid4().hex[:6]}"
    for _ in range(2):
        assert api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                        json={"language": "bash", "content": "echo"}).status_code == 201
    time.sleep(0.05)
    o = api.get("/api/dashboard/overview").json()
    row = next(r for r in o["queue"] if r["tag"] == tag)
    assert row["waiting"] == 2 and row["running"] == 0 and row["oldest_wait_s"] > 0
    assert {g["group"] for g in o["groups"]} >= {"default", "native"}
    assert isinstance(o["throughput"], list)
    active = api.get("/api/dashboard/jobs", params={"state": "queued", "tag": tag}).json()
    assert len(active["jobs"]) == 2 and active["next"] is None
    assert {j["state"] for j in active["jobs"]} == {"queued"}


def test_workers_show_their_running_job_and_last_init_run(make_cluster, ws):
    c = make_cluster()
    group = f"i{uuid.uuid4().hex[:6]}"
    c.start_worker(profile_text=f"name: {group}\ntags: [{group}]\nbackend: {{kind: process}}\n"
                                f"init_script: 'echo init-ran-here'\n")
    c.wait_workers(group)
    with c.client() as api:
        jid = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": group},
                       json={"language": "bash", "content": "echo go; sleep 30"}).text
        deadline = time.time() + 30
        while time.time() < deadline:
            w = next(w for w in api.get("/api/dashboard/workers").json()["workers"] if w["worker_group"] == group)
            if w["running"]:
                break
            time.sleep(0.2)
        assert [j["id"] for j in w["running"]] == [jid] and not w["dead"]
        assert w["last_init"]["status"] == "success"
        init = api.get(f"/api/w/admins/jobs_u/get/{w['last_init']['id']}").json()
        assert "init-ran-here" in init["logs"]
        assert api.get(f"/api/dashboard/groups/{group}").json() == {"group": group, "config": None}
        assert group in api.get("/api/dashboard/groups").json()["groups"]
        assert api.post(f"/api/w/{ws}/jobs_u/queue/cancel/{jid}", json={}).status_code == 200
        wait_done(api, ws, jid)


def test_the_page_and_its_assets_are_served_from_the_package(cluster):
    r = httpx.get(cluster.base + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert '<script type="module" src="/dashboard/app.js"' in r.text
    js = httpx.get(cluster.base + "/dashboard/app.js")
    assert js.status_code == 200 and 'from "./util.js"' in js.text and "javascript" in js.headers["content-type"]
    assert "sessionStorage" in httpx.get(cluster.base + "/dashboard/util.js").text
    assert httpx.get(cluster.base + "/dashboard/app.css").status_code == 200
    r = httpx.get(cluster.base + "/dashboard/__init__.py")
    assert r.status_code == 404 and "error" in r.json()
    # the data the page reads is the admin's
    assert httpx.get(cluster.base + "/api/dashboard/overview").status_code == 401
