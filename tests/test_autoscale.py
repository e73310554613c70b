"""The autoscaler end to end on real processes and a real PostgreSQL (a database of each
test's own, so no other server leads its lock): events and their API, scale to zero and the
waiting reason, full scale, the cooldown, one leader among servers, the script
integration with a real script, and the supervisor's choice of which worker to stop."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from sandmill.localscale import GroupScaler
from sandmill.profiles import profile_from_dict
from sandmill.store import db as dbmod
from sandmill.store import queue
from support import SLOWDOWN, TOKEN, recreate_database

FAST = {"SANDMILL_AUTOSCALE_INTERVAL_S": "1", "SANDMILL_WORKER_PING_S": "1", "SANDMILL_UP_SCALE_POLL_S": "0.5"}


@pytest.fixture()
def own_db(pg_server) -> str:
    name = f"sandmill_as_{uuid.uuid4().hex[:10]}"

    async def setup() -> str:
        url = await recreate_database(pg_server, name)
        await dbmod.migrate_url(url)
        return url

    return asyncio.run(setup())


def write_profile(tmp: Path, group: str, tag: str, subworkers: int = 4, **autoscaling) -> Path:
    p = tmp / f"{group}.yaml"
    p.write_text(json.dumps({"name": group, "tags": [tag], "native": True, "subworkers": subworkers,
                             "autoscaling": {"enabled": True, **autoscaling}}))
    return p


def push(url: str, tag: str, n: int, seconds: float = 1.0, ws: str = "ws1") -> list[str]:
    """Queue n sleep jobs through the store's push (the API's statement, NOTIFY included),
    in one transaction: a burst that lands at once."""
    async def go() -> list[str]:
        conn = await dbmod.connect(url)
        try:
            async with conn.transaction():
                return [str(await queue.push(conn, workspace=ws, language="sleep", content="",
                                             args={"seconds": seconds}, tag=tag)) for _ in range(n)]
        finally:
            await conn.close()
    return asyncio.run(go())


def events(c, group: str) -> list[dict]:
    with c.client() as api:
        r = api.get("/api/autoscaling/events", params={"group": group, "limit": 1000})
        assert r.status_code == 200, r.text
        return list(reversed(r.json()))  # oldest first


def wait_for(cond, timeout: float, what: str):
    deadline = time.time() + timeout * SLOWDOWN
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_dryrun_scale_to_zero_wakes_at_once_full_scale_and_waiting_reason(make_cluster, own_db, tmp_path):
    prof = write_profile(tmp_path, "dry", "dry-tag", min_workers=0, max_workers=5,
                         integration={"type": "dryrun"})
    # a long interval: only the NOTIFY of a job for a group at zero can act this soon
    c = make_cluster(env={**FAST, "SANDMILL_AUTOSCALE_INTERVAL_S": "600", "SANDMILL_PROFILES": str(prof)},
                     db_url=own_db)
    with c.client() as api:
        wait_for(lambda: api.get("/api/autoscaling/groups").json(), 10, "the group published")
        t0 = time.time()
        jid = api.post("/api/w/ws1/jobs/run/preview", params={"tag": "dry-tag"},
                       json={"language": "sleep", "content": "", "args": {"seconds": 1}}).text.strip('"')
        ev = wait_for(lambda: events(c, "dry"), 10, "a scale-out on the job's NOTIFY")
        assert time.time() - t0 < 5 * SLOWDOWN
        assert (ev[0]["event_type"], ev[0]["from_workers"], ev[0]["desired_workers"]) == ("scale_out", 0, 1)
        assert ev[0]["integration"] == "dryrun" and ev[0]["status"] == "recorded"
        assert "scaled to zero and 1 job(s) waiting" in ev[0]["reason"]
        # no worker serves the tag, but an autoscaled group does: a different reason
        j = api.get(f"/api/w/ws1/jobs_u/get/{jid}").json()
        assert j["waiting_reason"] == "group dry is scaled to zero; a worker is starting"
        other = api.post("/api/w/ws1/jobs/run/preview", params={"tag": "nobody-" + uuid.uuid4().hex[:6]},
                         json={"language": "sleep", "content": "", "args": {}}).text.strip('"')
        assert "no live worker serves tag" in api.get(f"/api/w/ws1/jobs_u/get/{other}").json()["waiting_reason"]
        groups = api.get("/api/autoscaling/groups").json()
        assert [(g["worker_group"], g["desired"]) for g in groups] == [("dry", 1)]
    # `sandmill workers` shows the group and its events
    r = subprocess.run([sys.executable, "-m", "sandmill", "workers", "--url", c.base], capture_output=True,
                       text=True, env={**os.environ, "SANDMILL_TOKEN": TOKEN, "COLUMNS": "400"}, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "occupancy 15s/5m/30m" in r.stdout and "autoscaled groups: dry (1 worker(s) asked)" in r.stdout
    assert "autoscaling events" in r.stdout and "scale_out" in r.stdout and "0 -> 1" in r.stdout
    with c.client() as api:
        # the filter
        assert api.get("/api/autoscaling/events", params={"group": "nope"}).json() == []
        assert api.get("/api/autoscaling/events", params={"limit": 0}).status_code == 422


def test_full_scale_on_a_large_backlog_and_cooldown_respected(make_cluster, own_db, tmp_path):
    prof = write_profile(tmp_path, "cool", "cool-tag", min_workers=0, max_workers=20, cooldown_seconds=3,
                         inc_num_workers=1, full_scale_jobs_waiting=50, integration={"type": "dryrun"})
    c = make_cluster(env={**FAST, "SANDMILL_PROFILES": str(prof)}, db_url=own_db)
    push(own_db, "cool-tag", 5)  # below the full-scale threshold: steps, a cooldown apart
    ev = wait_for(lambda: (e := events(c, "cool")) and len(e) >= 4 and e, 30, "four steps")
    steps = [(e["from_workers"], e["desired_workers"]) for e in ev[:4]]
    assert steps == [(0, 1), (1, 2), (2, 3), (3, 4)], ev
    times = [_ts(e["created_at"]) for e in ev[:4]]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(g >= 3.0 - 0.05 for g in gaps), gaps  # never inside the cooldown
    push(own_db, "cool-tag", 60)  # more than full_scale_jobs_waiting: to max, cooldown or not
    ev = wait_for(lambda: [e for e in events(c, "cool") if e["event_type"] == "full_scale_out"], 10,
                  "a full scale-out")
    assert ev[0]["desired_workers"] == 20 and "more than full_scale_jobs_waiting 50" in ev[0]["reason"]


def _ts(iso: str) -> float:
    import datetime as dt
    return dt.datetime.fromisoformat(iso).timestamp()


def test_two_servers_one_autoscaler_acts(make_cluster, own_db, tmp_path):
    prof = write_profile(tmp_path, "two", "two-tag", min_workers=0, max_workers=3, cooldown_seconds=1,
                         integration={"type": "dryrun"})
    env = {**FAST, "SANDMILL_PROFILES": str(prof)}
    a = make_cluster(env=env, db_url=own_db)
    b = make_cluster(env=env, db_url=own_db)
    push(own_db, "two-tag", 2)
    ev = wait_for(lambda: (e := events(a, "two")) and len(e) >= 3 and e, 30, "three events")
    assert len({e["server"] for e in ev}) == 1, ev  # one autoscaler acted
    assert [e["desired_workers"] for e in ev[:3]] == [1, 2, 3]  # no step taken twice

    async def lock_holders() -> int:
        conn = await dbmod.connect(own_db)
        try:
            return await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                                       " AND granted AND objid = ($1::bigint & 4294967295)::oid",
                                       0x5A4D_A5CA_1E00)
        finally:
            await conn.close()
    assert asyncio.run(lock_holders()) == 1
    # the leader goes: the other server takes over
    leader_pid = int(ev[0]["server"].rsplit("-", 1)[1])
    (a if a.procs[0].pid == leader_pid else b).procs[0].send_signal(signal.SIGKILL)
    other = b if a.procs[0].pid == leader_pid else a
    push(own_db, "two-tag", 1, ws="ws2")
    with other.client() as api:  # back to 0 then out again would be another server's event
        api.put("/api/configs/worker__two", json={"autoscaling": {"enabled": True, "min_workers": 1,
                                                                  "max_workers": 1, "integration": {"type": "dryrun"}}})
    ev2 = wait_for(lambda: [e for e in events(other, "two") if e["event_type"] == "clamp"], 30,
                   "the other server's clamp to the new max")
    assert ev2[0]["server"] != ev[0]["server"] and ev2[0]["desired_workers"] == 1


SCRIPT = """#!/bin/sh
echo "$1|$2|$3|$4" >> "{log}"
printf 'scaling %s to %s\\n' "$1" "$2"
printf 'bad bytes: \\377\\000 end\\n'
[ -e "{fail}" ] && {{ echo "refused" >&2; exit 7; }}
exit 0
"""


def test_script_integration_runs_a_real_script(make_cluster, own_db, tmp_path):
    log, fail = tmp_path / "calls.log", tmp_path / "fail"
    script = tmp_path / "scale.sh"
    script.write_text(SCRIPT.format(log=log, fail=fail))
    script.chmod(0o755)
    prof = write_profile(tmp_path, "scr", "scr-tag", min_workers=0, max_workers=2, cooldown_seconds=1,
                         integration={"type": "script", "path": str(script)})
    c = make_cluster(env={**FAST, "SANDMILL_PROFILES": str(prof)}, db_url=own_db)
    push(own_db, "scr-tag", 1)
    ev = wait_for(lambda: events(c, "scr"), 15, "the script's event")
    assert ev[0]["status"] == "exit 0" and ev[0]["integration"] == "script"
    assert "scaling scr to 1" in ev[0]["output"]
    assert "bad bytes: \ufffd\u2400 end" in ev[0]["output"]  # hostile bytes stored visibly
    assert log.read_text().splitlines()[0] == "scr|1|scaled to zero and 1 job(s) waiting|scale_out"
    fail.touch()  # now it fails: the event says so and the count stays (tried again next check)
    ev = wait_for(lambda: [e for e in events(c, "scr") if e["status"] == "exit 7"], 15, "a failed run")
    assert "refused" in ev[0]["output"] and ev[0]["desired_workers"] == 2
    with c.client() as api:
        assert [g["desired"] for g in api.get("/api/autoscaling/groups").json()] == [1]
    fail.unlink()
    wait_for(lambda: any(e["status"] == "exit 0" and e["desired_workers"] == 2 for e in events(c, "scr")),
             15, "the retry")


def test_a_bad_profile_stops_the_server_with_the_file_and_field(make_cluster, own_db, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntags: [x]\nautoscaling: {enabled: true, min_workers: 3, max_workers: 2}\n")
    with pytest.raises(RuntimeError) as e:
        make_cluster(env={"SANDMILL_PROFILES": str(bad)}, db_url=own_db)
    assert "field 'autoscaling': Value error, min_workers (3) is more than max_workers (2)" in str(e.value)


class _Child:
    def __init__(self, name: str):
        self.name, self.proc = name, None

    def start(self, env):
        self.proc = subprocess.Popen(["sleep", "60"])


def test_scale_in_stops_an_idle_worker_first():
    prof = profile_from_dict({"name": "g", "tags": ["t"], "autoscaling": {"enabled": True, "min_workers": 0,
                                                                           "max_workers": 4}})
    g = GroupScaler(prof, lambda i: _Child(f"g-{i}"))
    try:
        g.converge(3, {}, {})
        busy = {g.children[0].proc.pid: 2, g.children[1].proc.pid: 0, g.children[2].proc.pid: 1}
        g.converge(2, busy, {})
        assert [c.name for c in g.children] == ["g-0", "g-2"]  # the idle one went
        assert [c.name for c in g.stopping] == ["g-1"]
        g.stopping[0].proc.wait(5)
        assert g.stopping[0].proc.returncode == -signal.SIGTERM  # asked to stop, not killed
        g.converge(1, busy, {})
        assert [c.name for c in g.children] == ["g-0"]  # then the least busy
        g.reap()
        time.sleep(0.2)
        g.reap()
        assert g.stopping == []
    finally:
        for p in g.procs():
            p.kill()


def test_local_burst_scales_out_in_one_check_and_back_to_zero(own_db, tmp_path):
    """`sandmill up` with a group at min 0, max 4: 300 one-second jobs."""
    # 10 slots a worker: 4 workers' connections (a pool of 15 each) fit PostgreSQL's 100
    prof = write_profile(tmp_path, "burst", "burst-tag", subworkers=10, min_workers=0, max_workers=4,
                         cooldown_seconds=2, full_scale_cooldown_seconds=4)
    port = _free_port()
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen([sys.executable, "-m", "sandmill", "up", "--database-url", own_db, "--port", str(port),
                           "--data-dir", str(tmp_path / "data"), "--profile", str(prof)],
                          env={**os.environ, **FAST, "SANDMILL_ADMIN_TOKEN": TOKEN, "SANDMILL_GRACE_S": "10"},
                          stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {TOKEN}"},
                           timeout=30)
        wait_for(lambda: _get(api, "/api/autoscaling/groups"), 30, "the server and the group")
        assert _workers(api, "burst") == 0  # min 0: none at start
        ids = push(own_db, "burst-tag", 300, seconds=1.0)
        ev = wait_for(lambda: events_of(api, "burst"), 10, "the scale-out")
        assert (ev[0]["event_type"], ev[0]["from_workers"], ev[0]["desired_workers"]) == ("full_scale_out", 0, 4)
        wait_for(lambda: _workers(api, "burst") == 4, 30, "4 workers up")
        busy = wait_for(lambda: [w for w in _get(api, "/api/workers/list") or []
                                 if w["worker_group"] == "burst" and w["occupancy_15s"] > 0], 30,
                        "occupancy in the pings")
        assert all(0 < w["occupancy_15s"] <= 1 for w in busy)
        wait_for(lambda: _done(own_db, ids) == 300, 90, "every job done")
        wait_for(lambda: _workers(api, "burst") == 0 and events_of(api, "burst")[-1]["desired_workers"] == 0,
                 90, "back to zero")
        ev = events_of(api, "burst")
        assert [e["event_type"] for e in ev[1:]] == ["scale_in"] * (len(ev) - 1), ev
        assert _completions(own_db, ids) == (300, 300)  # each exactly once, all succeeded
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()


def events_of(api, group: str) -> list[dict]:
    return list(reversed(_get(api, "/api/autoscaling/events", group=group, limit=1000) or []))


def _get(api, path: str, **params):
    import httpx
    try:
        r = api.get(path, params=params)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def _workers(api, group: str) -> int:
    return sum(1 for w in _get(api, "/api/workers/list") or [] if w["worker_group"] == group)


def _free_port() -> int:
    from sandmill.localcluster import free_port
    return free_port()


def _done(url: str, ids: list[str]) -> int:
    return _completions(url, ids)[0]


def _completions(url: str, ids: list[str]) -> tuple[int, int]:
    async def go():
        conn = await dbmod.connect(url)
        try:
            r = await conn.fetchrow("SELECT count(*) AS n, count(*) FILTER (WHERE status = 'success') AS ok"
                                    " FROM completed_job WHERE id = ANY($1::uuid[])", [uuid.UUID(i) for i in ids])
            return r["n"], r["ok"]
        finally:
            await conn.close()
    return asyncio.run(go())
