"""Concurrency limits and priority, checked from the start and end times the database
records, under many racing workers."""

from __future__ import annotations

import time
import uuid
from collections import defaultdict

import asyncpg
import pytest

from support import wait_done

NATIVE_PROFILE = "name: {name}\ntags: [{tag}]\nnative: true\nsubworkers: {sub}\n"


def create(api, ws, path, **fields):
    body = {"path": path, "language": "sleep", "content": "", "tag": fields.pop("tag", None), **fields}
    r = api.post(f"/api/w/{ws}/scripts/create", json=body)
    assert r.status_code == 201, r.text


async def job_times(pg_url, ids):
    conn = await asyncpg.connect(pg_url)
    rows = await conn.fetch(
        "SELECT id::text, concurrency_key, extract(epoch FROM started_at) AS s,"
        " extract(epoch FROM completed_at) AS e, status FROM completed_job WHERE id = ANY($1::uuid[])", ids)
    await conn.close()
    return rows


def max_overlap(intervals):
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])  # ends sort first on ties
    cur = best = 0
    for _, d in events:
        cur += d
        best = max(best, cur)
    return best


def wait_all(pg_url, ids, timeout):
    import asyncio

    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = asyncio.run(job_times(pg_url, ids))
        if len(rows) == len(ids):
            return rows
        time.sleep(0.3)
    raise AssertionError(f"only {len(rows)}/{len(ids)} jobs completed in {timeout}s")


@pytest.mark.timeout(240)
def test_limits_hold_under_racing_workers(cluster, api, ws, pg_url):
    tag = "conc-" + uuid.uuid4().hex[:6]
    create(api, ws, "running", tag=tag, concurrent_limit=2, concurrency_key="$workspace-k-$args[k]")
    create(api, ws, "windowed", tag=tag, concurrent_limit=3, concurrency_time_window_s=1,
           concurrency_key="win-$workspace")
    ids = []
    for i in range(270):
        k = "abc"[i % 3]
        ids.append(api.post(f"/api/w/{ws}/jobs/run/p/running", json={"k": k, "seconds": 0.05}).text)
    for i in range(15):
        ids.append(api.post(f"/api/w/{ws}/jobs/run/p/windowed", json={"seconds": 0.01}).text)
    # the queue is full before the 3 x 8 subworkers start pulling at once
    workers = [cluster.start_worker(profile_text=NATIVE_PROFILE.format(name=f"conc{i}", tag=tag, sub=8))
               for i in range(3)]
    # jobs of other keys are not held back: this one has no limit and runs at once
    free = api.post(f"/api/w/{ws}/jobs/run_wait_result/preview", params={"tag": tag},
                    json={"content": "", "language": "noop", "args": {"value": 7}})
    assert free.status_code == 200 and free.json() == 7
    rows = wait_all(pg_url, ids, timeout=180)
    for w in workers:
        w.terminate()
    assert all(r["status"] == "success" for r in rows)
    by_key = defaultdict(list)
    for r in rows:
        by_key[r["concurrency_key"]].append((float(r["s"]), float(r["e"])))
    assert set(by_key) == {f"{ws}-k-a", f"{ws}-k-b", f"{ws}-k-c", f"win-{ws}"}
    for k in "abc":
        iv = by_key[f"{ws}-k-{k}"]
        assert len(iv) == 90
        assert max_overlap(iv) <= 2, f"key {k}: more than 2 jobs ran at once"
        assert max_overlap(iv) == 2, "the limit should have been used fully with 24 free slots"
    starts = sorted(s for s, _ in by_key[f"win-{ws}"])
    for a, b in zip(starts, starts[3:]):
        assert b - a >= 1.0 - 0.005, f"more than 3 starts within 1 s: {a} .. {b}"
    assert starts[-1] - starts[0] >= 4.0 - 0.01  # 15 jobs, 3 per second


def test_waiting_job_says_it_waits_for_its_key(cluster, api, ws):
    tag = "wait-" + uuid.uuid4().hex[:6]
    w = cluster.start_worker(profile_text=NATIVE_PROFILE.format(name="waitk", tag=tag, sub=4))
    cluster.wait_workers("waitk")
    create(api, ws, "one", tag=tag, concurrent_limit=1)
    first = api.post(f"/api/w/{ws}/jobs/run/p/one", json={"seconds": 3}).text
    second = api.post(f"/api/w/{ws}/jobs/run/p/one", json={"seconds": 0}).text
    deadline = time.time() + 10
    while api.get(f"/api/w/{ws}/jobs_u/get/{first}").json().get("running") is not True:
        assert time.time() < deadline
        time.sleep(0.05)
    j = api.get(f"/api/w/{ws}/jobs_u/get/{second}").json()
    assert j["running"] is False
    assert f"waiting for its concurrency key '{ws}/one'" in j["waiting_reason"]
    a, b = wait_done(api, ws, first), wait_done(api, ws, second)
    assert b["started_at"] >= a["completed_at"]  # started as soon as the slot was free ...
    from datetime import datetime
    gap = datetime.fromisoformat(b["started_at"]) - datetime.fromisoformat(a["completed_at"])
    assert gap.total_seconds() < 1.0  # ... without waiting for a poll
    w.terminate()


@pytest.mark.parametrize("fields,needle", [
    ({"concurrent_limit": 0}, "concurrent_limit"),
    ({"concurrent_limit": 1, "concurrency_time_window_s": -1}, "concurrency_time_window_s"),
    ({"priority": 0}, "priority"),
    ({"priority": 101}, "priority"),
    ({"concurrency_key": "x"}, "need concurrent_limit"),
])
def test_bad_limits_refused_at_create(api, ws, fields, needle):
    r = api.post(f"/api/w/{ws}/scripts/create", json={"path": "p", "language": "sleep", "content": "", **fields})
    assert r.status_code == 422 and needle in r.json()["error"], r.text


def test_key_naming_missing_arg_refused_at_submit(api, ws):
    create(api, ws, "k", concurrent_limit=1, concurrency_key="$args[user]")
    r = api.post(f"/api/w/{ws}/jobs/run/p/k", json={"other": 1})
    assert r.status_code == 400 and "$args[user]" in r.json()["error"]
    for bad in ("0", "101", "x"):
        r = api.post(f"/api/w/{ws}/jobs/run/p/k", json={"user": "u"}, params={"priority": bad})
        assert r.status_code == 422 and "priority" in r.json()["error"]


def test_priority_order_then_submission_order(cluster, api, ws, pg_url):
    tag = "prio-" + uuid.uuid4().hex[:6]
    create(api, ws, "p", tag=tag)
    plan = [None, 10, 50, None, 50, 100, 10, 1]
    ids = [api.post(f"/api/w/{ws}/jobs/run/p/p", json={"seconds": 0},
                    params={"priority": p} if p else {}).text for p in plan]
    w = cluster.start_worker(profile_text=NATIVE_PROFILE.format(name="prio", tag=tag, sub=1))
    rows = wait_all(pg_url, ids, timeout=30)
    w.terminate()
    started = [r["id"] for r in sorted(rows, key=lambda r: r["s"])]
    expected = [ids[i] for i in sorted(range(len(plan)), key=lambda i: (-(plan[i] or 0), i))]
    assert started == expected


def test_scheduled_job_starts_on_time_not_before(api, ws):
    jid = api.post(f"/api/w/{ws}/jobs/run/preview", params={"scheduled_in_secs": 2},
                   json={"content": "def main():\n    return 1\n", "language": "python3"}).text
    j = api.get(f"/api/w/{ws}/jobs_u/get/{jid}").json()
    assert j["running"] is False and "scheduled for" in j["waiting_reason"]
    done = wait_done(api, ws, jid, timeout=20)
    from datetime import datetime
    late = (datetime.fromisoformat(done["started_at"]) - datetime.fromisoformat(done["scheduled_for"])).total_seconds()
    assert 0 <= late < 1.0, late
