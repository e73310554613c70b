"""/metrics is Prometheus text from prometheus_client, parsed here by its own parser, with
values checked after known jobs ran: counters and histograms derived from completed_job
(labelled with the group and backend of the worker that ran each job), queue gauges."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import wait_done
from sandmill.store import db as dbmod


def scrape(api) -> dict[str, list]:
    r = api.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def value(fams: dict, sample: str, **labels: str) -> float | None:
    """The value of the sample named ``sample`` whose labels include ``labels``, summed."""
    family = next((n for n in fams if sample.startswith(n)), None)
    found = [s.value for n, samples in fams.items() if sample.startswith(n) for s in samples
             if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert family is not None, f"no family for {sample} in {sorted(fams)}"
    return sum(found) if found else None


def test_metrics_count_known_jobs_by_group_language_backend_and_status(make_cluster):
    c = make_cluster()
    group, tag = f"m{uuid.uuid4().hex[:6]}", f"mt-{uuid.uuid4().hex[:6]}"
    c.start_worker(group, tags=tag, subworkers=2)
    c.wait_workers(group)
    ws = "metrics" + uuid.uuid4().hex[:6]
    with c.client() as api:
        ids = []
        for content in ("echo ok", "echo ok", "sleep 0.3; echo ok", "exit 3"):
            r = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                         json={"language": "bash", "content": content})
            assert r.status_code == 201, r.text
            ids.append(r.text)
        # a job nobody serves: it waits, and its tag's oldest wait grows
        lonely = f"nobody-{uuid.uuid4().hex[:6]}"
        assert api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": lonely},
                        json={"language": "bash", "content": "echo"}).status_code == 201
        for i in ids:
            wait_done(api, ws, i, timeout=60)
        time.sleep(0.3)
        fams = scrape(api)
        g = dict(group=group, language="bash", backend="process")
        assert value(fams, "sandmill_jobs_completed_total", **g, status="success") == 3
        assert value(fams, "sandmill_jobs_completed_total", **g, status="failure") == 1
        assert value(fams, "sandmill_jobs_started_total", **g) == 4
        # histograms: every started job is counted; the 0.3 s job is above the 0.25 s bound
        assert value(fams, "sandmill_job_duration_seconds_count", **g, status="success") == 3
        assert value(fams, "sandmill_job_duration_seconds_bucket", **g, status="success", le="+Inf") == 3
        assert value(fams, "sandmill_job_duration_seconds_bucket", **g, status="success", le="0.25") <= 2
        assert value(fams, "sandmill_job_duration_seconds_sum", **g, status="success") >= 0.3
        assert value(fams, "sandmill_job_queue_wait_seconds_count", **g) == 4
        # gauges
        assert value(fams, "sandmill_queue_jobs_waiting", tag=lonely) == 1
        assert value(fams, "sandmill_queue_oldest_wait_seconds", tag=lonely) > 0
        assert value(fams, "sandmill_workers_alive", group=group) == 1
        assert value(fams, "sandmill_worker_subworkers", group=group) == 2
        assert value(fams, "sandmill_worker_occupancy_ratio", group=group) is not None


def test_counters_come_from_the_table_so_a_new_server_reads_the_same_totals(make_cluster, pg_url):
    """Completed jobs older than the fold lag (here, backdated an hour) are folded into the
    totals once; another server process (a restart) reads the same totals, not zero."""
    group = f"h{uuid.uuid4().hex[:6]}"
    worker = f"{group}-host-1"

    async def seed() -> None:
        conn = await dbmod.connect(pg_url)
        try:
            await conn.execute("INSERT INTO worker_history (name, worker_group, backend) VALUES ($1, $2, 'nsjail')",
                               worker, group)
            await conn.execute(
                "INSERT INTO completed_job (id, workspace, kind, language, tag, created_at, scheduled_for,"
                " started_at, completed_at, worker, status, duration_ms)"
                " SELECT gen_random_uuid(), 'old', 'script', 'python3', 't', now() - interval '2 hours',"
                " now() - interval '2 hours', now() - interval '2 hours' + interval '2 seconds',"
                " now() - interval '1 hour', $1, 'success', 40 FROM generate_series(1, 5)", worker)
        finally:
            await conn.close()

    asyncio.run(seed())
    labels = dict(group=group, language="python3", backend="nsjail", status="success")
    first, second = make_cluster(), make_cluster()
    with first.client() as a, second.client() as b:
        for api in (a, a, b):  # the second scrape of one server reads its folded totals
            fams = scrape(api)
            assert value(fams, "sandmill_jobs_completed_total", **labels) == 5
            assert value(fams, "sandmill_job_duration_seconds_bucket", **labels, le="0.05") == 5
            assert value(fams, "sandmill_job_duration_seconds_bucket", **labels, le="0.025") == 0
            wait = dict(group=group, language="python3", backend="nsjail")
            assert value(fams, "sandmill_job_queue_wait_seconds_bucket", **wait, le="2.5") == 5
            assert value(fams, "sandmill_job_queue_wait_seconds_bucket", **wait, le="1.0") == 0


def test_metrics_need_the_admin_token(cluster):
    import httpx
    r = httpx.get(cluster.base + "/metrics")
    assert r.status_code == 401 and "error" in r.json()


STMT = "sandmill_worker_statement_duration_seconds"


def wait_statement_counts(api, group: str, statements: tuple[str, ...], at_least: int) -> dict:
    """Scrape until the group's ``statements`` were timed ``at_least`` times in all (a
    ping came after the last of them); the last scrape."""
    deadline, n, fams = time.time() + 30, 0.0, {}
    while time.time() < deadline:
        fams = scrape(api)
        if STMT in fams:
            n = sum(value(fams, f"{STMT}_count", group=group, statement=s) or 0 for s in statements)
            if n >= at_least:
                return fams
        time.sleep(0.2)
    raise AssertionError(f"{group}: {n} of {statements} timed, not {at_least}: {fams.get(STMT)}")


def test_workers_report_their_claim_and_completion_statement_latency(make_cluster):
    """A DB worker times its claims and completions (worker/stmt_timing.py) and sends the
    histograms with its ping; /metrics publishes them per group and statement."""
    c = make_cluster()
    group, tag = f"s{uuid.uuid4().hex[:6]}", f"st-{uuid.uuid4().hex[:6]}"
    c.start_worker(group, tags=tag, subworkers=2, env={"SANDMILL_WORKER_PING_S": "0.3"})
    c.wait_workers(group)
    ws = "stmt" + uuid.uuid4().hex[:6]
    with c.client() as api:
        ids = []
        for _ in range(4):
            r = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                         json={"language": "bash", "content": "echo ok"})
            assert r.status_code == 201, r.text
            ids.append(r.text)
        for i in ids:
            wait_done(api, ws, i, timeout=60)
        # completions go in batches: fewer statements than jobs, at least one
        fams = wait_statement_counts(api, group, ("complete", "complete_and_claim"), 1)
        assert (value(fams, f"{STMT}_count", group=group, statement="claim") or 0) > 0
        for stmt in ("claim", "complete_and_claim"):
            n = value(fams, f"{STMT}_count", group=group, statement=stmt) or 0
            if n:  # a histogram whose +Inf bucket is its count, and a positive time sum
                assert value(fams, f"{STMT}_bucket", group=group, statement=stmt, le="+Inf") == n
                assert value(fams, f"{STMT}_sum", group=group, statement=stmt) > 0


def test_dedicated_workers_report_their_batch_claim_and_completion_latency(make_cluster):
    c = make_cluster()
    ws, group = "dstmt" + uuid.uuid4().hex[:6], f"ds{uuid.uuid4().hex[:6]}"
    c.start_worker(profile_text=f"name: {group}\ndedicated_workers: [\"{ws}:f/d\"]\n"
                                "backend: {kind: process}\nsubworkers: 1\n",
                   env={"SANDMILL_WORKER_PING_S": "0.3"})
    c.wait_workers(group)
    with c.client() as api:
        r = api.post(f"/api/w/{ws}/scripts/create", json={
            "path": "f/d", "content": "def main(x):\n    return x\n", "language": "python3",
            "dedicated_worker": True})
        assert r.status_code == 201, r.text
        ids = []
        for i in range(3):
            r = api.post(f"/api/w/{ws}/jobs/run/p/f/d", json={"x": i})
            assert r.status_code == 201, r.text
            ids.append(r.text)
        for i in ids:
            assert wait_done(api, ws, i, timeout=60)["success"]
        fams = wait_statement_counts(api, group, ("dedicated_complete",), 1)
        assert (value(fams, f"{STMT}_count", group=group, statement="dedicated_claim") or 0) > 0
