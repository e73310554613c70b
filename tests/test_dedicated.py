"""Dedicated workers (worker/dedicated.py): a group dedicated to scripts runs their jobs in
long-lived runtimes inside its sandbox; each job is its own record (result, logs, status),
faults cost only the job that caused them, and new versions take over without a restart."""

from __future__ import annotations

import time
import uuid

import pytest

from support import SLOWDOWN, wait_done

PROFILE = """
name: {name}
dedicated_workers: [{scripts}]
backend: {{kind: {kind}}}
subworkers: {sub}
limits: {{wall_s: {wall}, memory_mb: 128}}
"""


def group(c, ws: str, paths: list[str], kind: str = "process", sub: int = 1, wall: float = 5):
    """Start a worker dedicated to ``paths`` of ``ws``; its group name."""
    name = "ded-" + uuid.uuid4().hex[:6]
    c.start_worker(profile_text=PROFILE.format(name=name, kind=kind, sub=sub, wall=wall,
                                               scripts=", ".join(f'"{ws}:{p}"' for p in paths)))
    c.wait_workers(name)
    return name


def script(api, ws: str, path: str, content: str, **kw) -> str:
    r = api.post(f"/api/w/{ws}/scripts/create", json={"path": path, "content": content,
                                                      "language": "python3", "dedicated_worker": True, **kw})
    assert r.status_code == 201, r.text
    return r.text


def run(api, ws: str, path: str, args: dict | None = None, **params) -> str:
    r = api.post(f"/api/w/{ws}/jobs/run/p/{path}", json=args or {}, params=params)
    assert r.status_code == 201, r.text
    return r.text


def done(api, ws, jid, timeout=30):
    return wait_done(api, ws, jid, timeout=timeout * SLOWDOWN)


COUNTER = """
import os
N = 0
def main(x):
    global N
    N += 1
    print(f"job {x} sees N={N}")
    return {"x": x, "n": N, "pid": os.getpid(), "uid": os.getuid()}
"""


@pytest.mark.parametrize("kind", ["process", "nsjail"])
def test_jobs_run_in_one_runtime_each_its_own_record(make_cluster, ws, kind):
    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/count", COUNTER)
        group(c, ws, ["f/count"], kind=kind)
        ids = [run(api, ws, "f/count", {"x": i}) for i in range(5)]
        jobs = [done(api, ws, j) for j in ids]
    for i, j in enumerate(jobs):
        assert j["success"], j
        assert j["result"]["x"] == i
        assert j["result"]["uid"] == 65534
        assert f"job {i} sees N={j['result']['n']}" in j["logs"], j["logs"]
        assert f"job {i + 1}" not in j["logs"]  # each job's own output only
    assert [j["result"]["n"] for j in jobs] == [1, 2, 3, 4, 5]  # module state persists


FAULTY = """
import ctypes, os, time
N = 0
def main(mode):
    global N
    N += 1
    if mode == "raise":
        raise ValueError("no good")
    if mode == "exit":
        os._exit(3)
    if mode == "segv":
        ctypes.string_at(0)
    if mode == "memory":
        hog = [bytearray(1024 * 1024) for _ in range(1024)]
    if mode == "sleep":
        time.sleep(60)
    return N
"""

FAULTS = {
    "raise": "ValueError: no good",
    "exit": "ExitCode: the job ended the runtime: exited with code 3",
    "segv": "Signalled: killed by signal SIGSEGV (the runtime was replaced)",
    "memory": "MemoryLimit: killed: memory limit of 128 MB reached (the runtime was replaced)",
    "sleep": "Timeout: timed out: wall-clock limit of 2 s reached (the runtime was replaced)",
}


@pytest.mark.parametrize("kind, mode", [("process", m) for m in FAULTS] + [("nsjail", "memory"), ("nsjail", "segv")])
def test_a_fault_costs_only_its_job_and_the_jobs_sent_ahead_run_once(make_cluster, ws, kind, mode):
    """Five jobs, the faulty one, five more, all queued before the worker starts (so all
    are claimed in one batch and sent ahead): the faulty one fails with its exact reason,
    the others succeed, each run exactly once (the counter of the runtime that ran them
    has no gap: a job run twice would make one)."""
    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/faulty", FAULTY)
        ids = [run(api, ws, "f/faulty", {"mode": m}) for m in ["ok"] * 5 + [mode] + ["ok"] * 5]
        group(c, ws, ["f/faulty"], kind=kind, wall=2)
        jobs = [done(api, ws, j) for j in ids]
    bad = jobs[5]
    assert not bad["success"] and bad["error"] == FAULTS[mode], bad
    assert all(j["success"] for j in jobs[:5] + jobs[6:]), [j["error"] for j in jobs]
    assert [j["result"] for j in jobs[:5]] == [1, 2, 3, 4, 5]
    after = [j["result"] for j in jobs[6:]]
    if mode == "raise":  # the runtime goes on
        assert after == [7, 8, 9, 10, 11]
    else:  # a new runtime ran them, once each
        assert after == [1, 2, 3, 4, 5]


def test_an_import_failure_fails_the_jobs_and_is_retried_with_backoff(make_cluster, ws):
    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/broken", "import os\nprint('importing', flush=True)\n"
                                    "raise RuntimeError('boom at import')\ndef main():\n    return 1\n")
        ids = [run(api, ws, "f/broken") for _ in range(8)]
        group(c, ws, ["f/broken"])
        t0 = time.monotonic()
        jobs = [done(api, ws, j) for j in ids]
        more = [done(api, ws, run(api, ws, "f/broken")) for _ in range(3)]
        took = time.monotonic() - t0
    for j in jobs + more:
        assert not j["success"] and j["error"].startswith("RuntimeError: boom at import"), j["error"]
    # one import tried for the first batch; the jobs after it within the backoff are failed
    # from the first try's error without another import
    attempts = sum("importing" in j["logs"] for j in jobs + more)
    assert attempts <= 2, [j["logs"] for j in jobs + more]
    assert took < 20 * SLOWDOWN


def test_cancel_kills_the_running_job_and_the_next_job_runs(make_cluster, ws):
    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/faulty", FAULTY)
        group(c, ws, ["f/faulty"], wall=60)
        slow = run(api, ws, "f/faulty", {"mode": "sleep"})
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not api.get(f"/api/w/{ws}/jobs_u/get/{slow}").json().get("running"):
            time.sleep(0.05)
        t0 = time.monotonic()
        r = api.post(f"/api/w/{ws}/jobs_u/queue/cancel/{slow}", json={"reason": "enough"})
        assert r.status_code == 200, r.text
        j = done(api, ws, slow, timeout=10)
        assert time.monotonic() - t0 < 8 * SLOWDOWN
        nxt = done(api, ws, run(api, ws, "f/faulty", {"mode": "ok"}))
    assert j["status"] == "canceled" and j["error"] == "canceled: enough", j
    assert nxt["success"] and nxt["result"] == 1  # in a new runtime


BORN = """
import builtins, time
builtins.__dict__.setdefault("sandmill_test_born", time.time())
def main():
    return ["{v}", builtins.sandmill_test_born]
"""


def test_a_new_version_runs_on_the_next_job_without_a_restart(make_cluster, ws):
    c = make_cluster()
    with c.client() as api:
        h1 = script(api, ws, "f/ver", BORN.format(v="v1"))
        group(c, ws, ["f/ver"])
        a = done(api, ws, run(api, ws, "f/ver"))
        h2 = script(api, ws, "f/ver", BORN.format(v="v2"))
        b = done(api, ws, run(api, ws, "f/ver"))
        old = done(api, ws, api.post(f"/api/w/{ws}/jobs/run/h/{h1}", json={}).text)
    assert h1 != h2
    assert a["result"][0] == "v1" and b["result"][0] == "v2" and old["result"][0] == "v1"
    assert a["result"][1] == b["result"][1] == old["result"][1]  # one process: no restart


def test_a_group_serves_every_listed_script_each_in_its_own_runtime(make_cluster, ws):
    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/a", BORN.format(v="a"))
        script(api, ws, "f/b", BORN.format(v="b"))
        group(c, ws, ["f/a", "f/b"], kind="nsjail")
        a = done(api, ws, run(api, ws, "f/a"))
        b = done(api, ws, run(api, ws, "f/b"))
        ws_list = api.get("/api/workers/list").json()
    assert a["result"][0] == "a" and b["result"][0] == "b"
    assert a["result"][1] != b["result"][1]  # nothing shared between scripts
    mine = [w for w in ws_list if w["worker_group"].startswith("ded-")]
    assert any(sorted(w.get("dedicated") or []) == [f"{ws}:f/a", f"{ws}:f/b"] for w in mine), mine
    import os
    import subprocess
    import sys

    from support import TOKEN
    out = subprocess.run([sys.executable, "-m", "sandmill", "workers", "--url", c.base], capture_output=True,
                         text=True, env={**os.environ, "SANDMILL_TOKEN": TOKEN}).stdout
    assert f"dedicated to {ws}:f/a, {ws}:f/b" in out, out


NET = """
import os, socket
def main(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        net = "connected"
    except OSError as e:
        net = type(e).__name__
    try:
        open("/etc/shadow").read()
        shadow = "read"
    except OSError as e:
        shadow = type(e).__name__
    return {"net": net, "uid": os.getuid(), "shadow": shadow}
"""


@pytest.mark.parametrize("kind", ["process", "nsjail"])
def test_the_runtime_is_isolated_as_a_job(make_cluster, ws, kind):
    c = make_cluster()
    port = int(c.base.rsplit(":", 1)[1])
    with c.client() as api:
        script(api, ws, "f/net", NET)
        group(c, ws, ["f/net"], kind=kind)
        j = done(api, ws, run(api, ws, "f/net", {"port": port}))
    assert j["success"], j
    assert j["result"]["net"] != "connected" and j["result"]["uid"] == 65534, j["result"]
    assert j["result"]["shadow"] != "read"


def test_no_worker_says_so_and_scheduled_for_holds_the_job(make_cluster, ws):
    import datetime as dt

    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/lonely", "def main():\n    return 1\n")
        jid = run(api, ws, "f/lonely")
        why = api.get(f"/api/w/{ws}/jobs_u/get/{jid}").json()["waiting_reason"]
        assert "no live worker is dedicated to script f/lonely" in why, why
        at = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=3)
        later = run(api, ws, "f/lonely", scheduled_for=at.isoformat())
        j = api.get(f"/api/w/{ws}/jobs_u/get/{later}").json()
        assert abs(dt.datetime.fromisoformat(j["scheduled_for"]) - at) < dt.timedelta(seconds=0.5)
        assert j["waiting_reason"].startswith("scheduled for")
        bad = api.post(f"/api/w/{ws}/jobs/run/p/f/lonely", json={}, params={"scheduled_for": "soon"})
        assert bad.status_code == 400 and "scheduled_for" in bad.json()["error"]
        group(c, ws, ["f/lonely"])
        first = done(api, ws, jid)
        second = done(api, ws, later)
    assert first["success"] and second["success"]
    assert dt.datetime.fromisoformat(second["started_at"]) >= at - dt.timedelta(seconds=0.05)


def test_config_refusals(make_cluster, ws):
    c = make_cluster()
    with c.client() as api:
        r = api.post(f"/api/w/{ws}/scripts/create", json={"path": "f/sh", "content": "echo hi\n",
                                                          "language": "bash", "dedicated_worker": True})
        assert r.status_code == 422 and "only python3" in r.text, r.text
        r = api.put("/api/configs/worker__dd", json={"dedicated_worker": f"{ws}:f/x",
                                                    "backend": {"kind": "docker"}})
        assert r.status_code == 422 and "docker cannot host a long-lived runtime" in r.text, r.text
        r = api.put("/api/configs/worker__dd", json={"dedicated_worker": f"{ws}:f/x"})
        assert r.status_code == 200, r.text


SLEEPER = """
import time
def main(s):
    time.sleep(s)
    return s
"""


def test_heartbeats_cover_held_jobs_and_a_stop_gives_back_what_it_did_not_finish(make_cluster, ws):
    import signal

    c = make_cluster(env={"SANDMILL_PING_TIMEOUT_S": "2", "SANDMILL_MONITOR_EVERY_S": "0.5",
                          "SANDMILL_GRACE_S": "1"})
    with c.client() as api:
        script(api, ws, "f/sleep", SLEEPER)
        name = group(c, ws, ["f/sleep"], wall=20)
        w = c.procs[-1]
        # held 4 s behind a running job, twice the ping timeout: none is taken away
        ids = [run(api, ws, "f/sleep", {"s": s}) for s in (4, 0, 0, 0)]
        jobs = [done(api, ws, j) for j in ids]
        assert all(j["success"] and j["restarts"] == 0 for j in jobs), [(j["error"], j["restarts"]) for j in jobs]
        assert "restart" not in "".join(j["logs"] for j in jobs)
        # a stop while a job runs, jobs waiting behind it: nothing is lost or failed
        ids = [run(api, ws, "f/sleep", {"s": s}) for s in (5, 0, 0, 0, 0)]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not api.get(f"/api/w/{ws}/jobs_u/get/{ids[0]}").json().get("running"):
            time.sleep(0.05)
        w.send_signal(signal.SIGTERM)
        assert w.wait(timeout=20) == 0
        back = [api.get(f"/api/w/{ws}/jobs_u/get/{j}").json() for j in ids]
        assert all(j["type"] == "QueuedJob" and not j["running"] for j in back), \
            [(j["type"], j.get("running"), j.get("worker"), j.get("result")) for j in back]
        c.start_worker(profile_text=PROFILE.format(name=name, kind="process", sub=1, wall=20,
                                                   scripts=f'"{ws}:f/sleep"'))
        jobs = [done(api, ws, j) for j in ids]
    assert all(j["success"] for j in jobs), [j["error"] for j in jobs]


FORGER = """
import os, socket, stat, struct
def main(mode, victim=""):
    print("wm_res[success]: 42")  # Windmill's framing, forged on stdout: just a log line here
    if mode == "frame":  # a frame for another job, written on the control channel itself
        for fd in range(3, 256):
            try:
                if stat.S_ISSOCK(os.fstat(fd).st_mode):
                    body = b"42"
                    os.write(fd, struct.pack("<IB16s", len(body), ord("D"), bytes.fromhex(victim)) + body)
            except OSError:
                pass
    return mode
"""


def test_a_job_cannot_forge_a_result(make_cluster, ws):
    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/forge", FORGER)
        printed = run(api, ws, "f/forge", {"mode": "print"})
        victim = run(api, ws, "f/forge", {"mode": "victim"}, scheduled_in_secs=3)
        forger = run(api, ws, "f/forge", {"mode": "frame", "victim": uuid.UUID(victim).hex})
        group(c, ws, ["f/forge"])
        p, f, v = done(api, ws, printed), done(api, ws, forger), done(api, ws, victim)
    assert p["success"] and p["result"] == "print" and "wm_res[success]: 42" in p["logs"]
    assert not f["success"] and f["error"].startswith("ProtocolViolation:"), f["error"]
    assert v["success"] and v["result"] == "victim"  # its own result, run by the next runtime
