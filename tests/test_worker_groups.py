"""Worker groups: profiles, the group config API and live reload, tag routing (with
workspace-restricted worker tags), advertised capabilities, the GPU guard, init and
periodic scripts."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from support import REPO, TOKEN, wait_done
from sandmill.localcluster import LocalCluster
from sandmill.store.queue import split_tags
from sandmill.worker.sysinfo import detect_gpus


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"




def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sandmill", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def submit(api: httpx.Client, ws: str, content: str, tag: str, language: str = "python3",
           args: dict | None = None) -> str:
    r = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                 json={"content": content, "language": language, "args": args or {}})
    assert r.status_code == 201, r.text
    return r.text


def proc_log(c: LocalCluster, p: subprocess.Popen) -> str:
    return (c.tmp / f"proc-{c.procs.index(p)}.log").read_text(errors="replace")


def wait_until(pred, timeout: float, what: str, step: float = 0.1):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---- 1. profiles ------------------------------------------------------------------------------

BAD_PROFILES = {
    "unknown_field": ("name: a\ntags: [x]\nsubwrokers: 2\n", "subwrokers", "Extra inputs are not permitted"),
    "bad_tag": ("name: a\ntags: ['has space']\n", "tags", "bad tag 'has space'"),
    "zero_subworkers": ("name: a\ntags: [x]\nsubworkers: 0\n", "subworkers", "greater than or equal to 1"),
    "bad_limit": ("name: a\ntags: [x]\nlimits: {memory_mb: 0}\n", "limits.memory_mb", "greater than 0"),
    "not_yaml": ("name: a\ntags: [x\n  : - :\n", None, "not valid YAML"),
    # a misspelled backend option used to pass, and the worker ran jobs on process
    "backend_option": ("name: a\ntags: [x]\nbackend: {kind: nsjail, warmm: false}\n",
                       "backend.nsjail.warmm", "Extra inputs are not permitted (backend nsjail takes:"),
    "backend_fallback": ("name: a\ntags: [x]\nbackend: {kind: docker, fallback: process}\n",
                         "backend", "never falls back"),
}


def test_profiles_check_names_file_field_and_reason(tmp_path):
    files = []
    for key, (text, _field, _reason) in BAD_PROFILES.items():
        f = tmp_path / f"{key}.yaml"
        f.write_text(text)
        files.append(str(f))
    good = str(REPO / "profiles" / "default.yaml")
    r = cli("profiles", "check", good, *files)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{good}: ok" in r.stdout
    for key, (_text, field, reason) in BAD_PROFILES.items():
        lines = [line for line in r.stderr.splitlines() if f"{key}.yaml" in line]
        assert lines, f"{key}: not reported: {r.stderr}"
        assert any(reason in line and (field is None or f"field '{field}'" in line) for line in lines), (key, lines)
    # every shipped profile is valid
    r = cli("profiles", "check", *sorted(str(p) for p in (REPO / "profiles").glob("*.yaml")))
    assert r.returncode == 0, r.stderr


def test_worker_with_bad_profile_exits_2_before_connecting(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("name: a\ntags: [x]\nsubworkers: 0\n")
    t0 = time.time()
    # a database that does not exist: the worker must not even try it
    r = cli("worker", "--profile", str(f), env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    assert r.returncode == 2
    assert "invalid profile" in r.stderr and "field 'subworkers'" in r.stderr
    assert "connect" not in r.stderr.lower()
    assert time.time() - t0 < 20


def test_worker_with_misspelled_backend_option_exits_2_before_connecting(tmp_path):
    f = tmp_path / "typo.yaml"
    f.write_text("name: a\ntags: [x]\nbackend: {kind: nsjail, warmm: false}\n")
    r = cli("worker", "--profile", str(f), env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    assert r.returncode == 2, r.stdout + r.stderr
    assert "invalid profile" in r.stderr and "field 'backend.nsjail.warmm'" in r.stderr, r.stderr
    assert "connect" not in r.stderr.lower()


def test_explicit_backend_that_cannot_run_refuses_to_start_and_runs_nothing(make_cluster, ws):
    c = make_cluster()
    tag, group = uid("dk"), uid("dockerless")
    with c.client() as api:
        jid = submit(api, ws, "def main():\n    return 'ran'\n", tag)  # waiting for this group
        p = c.start_worker(profile_text=f"name: {group}\ntags: [{tag}]\n"
                                        "backend: {kind: docker, docker_url: 'unix:///nonexistent/docker.sock'}\n")
        assert p.wait(timeout=60) == 2, proc_log(c, p)
        out = proc_log(c, p)
        assert "cannot start" in out and "backend docker is not available here" in out, out
        assert not [w for w in api.get("/api/workers/list").json() if w["worker_group"] == group]
        j = api.get(f"/api/w/{ws}/jobs_u/get/{jid}").json()
        assert j["type"] == "QueuedJob" and j["running"] is False, j
        assert api.post(f"/api/w/{ws}/jobs_u/queue/cancel/{jid}", json={}).status_code == 200


def test_auto_backend_says_what_it_chose_and_why(make_cluster, ws):
    c = make_cluster()
    tag, group = uid("auto"), uid("auto")
    c.start_worker(profile_text=f"name: {group}\ntags: [{tag}]\nbackend: {{kind: auto}}\n")
    c.wait_workers(group)
    with c.client() as api:
        w = next(w for w in api.get("/api/workers/list").json() if w["worker_group"] == group)
        jid = submit(api, ws, "def main():\n    return 'ran'\n", tag)
        assert wait_done(api, ws, jid)["result"] == "ran"
    if w["backend"] == "nsjail":
        assert w["backend_reason"] == "kind: auto chose nsjail: its probe says it works here", w
    else:  # a host where nsjail cannot run: the reason is its probe's
        assert w["backend"] == "process" and w["backend_reason"].startswith(
            "kind: auto chose process: backend nsjail"), w
    r = cli("workers", "--url", c.base, env={"SANDMILL_TOKEN": TOKEN, "COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    assert f"{w['worker']}: backend {w['backend']}: {w['backend_reason']}" in r.stdout, r.stdout


# ---- 2. group config in the DB ----------------------------------------------------------------

@pytest.mark.parametrize("body,field", [
    ({"tags": "python3"}, "tags"),
    ({"tags": ["bad tag"]}, "tags"),
    ({"subworkers": 0}, "subworkers"),
    ({"tagz": ["x"]}, "tagz"),
    ({"periodic_interval_s": 0}, "periodic_interval_s"),
    ({"limits": {"memory_mb": -1}}, "limits.memory_mb"),
    ({"name": "other"}, "name"),
    (["tags"], "body"),
    ({"backend": {"kind": "nsjail", "warmm": False}}, "backend.nsjail.warmm"),
    ({"backend": {"warmm": False}}, "backend.auto.warmm"),
    ({"backend": {"kind": "process", "fallback": "refuse"}}, "backend"),
])
def test_group_config_refuses_bad_input_naming_the_field(api, body, field):
    r = api.put(f"/api/configs/worker__{uid('g')}", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["field"] == field and d["reason"] for d in detail), detail
    assert field in r.json()["error"]


def test_group_config_get_put(api):
    group = uid("g")
    r = api.get(f"/api/configs/worker__{group}")
    assert r.status_code == 404 and group in r.json()["error"]
    assert api.get("/api/configs/not_a_group_config").status_code == 404
    cfg = {"tags": ["a", "b(ws1+ws2)"], "limits": {"wall_s": 5}}
    r = api.put(f"/api/configs/worker__{group}", json=cfg)
    assert r.status_code == 200, r.text
    assert api.get(f"/api/configs/worker__{group}").json() == cfg
    # Windmill's paths answer the same
    assert api.get(f"/api/configs/get/worker__{group}").json() == cfg


def test_tag_change_reaches_a_running_worker_without_restart(make_cluster, ws):
    c = make_cluster()
    group, old_tag, new_tag = uid("live"), uid("old"), uid("new")
    p = c.start_worker(name=group, tags=old_tag)
    c.wait_workers(group)
    with c.client() as api:
        name = next(w["worker"] for w in api.get("/api/workers/list").json() if w["worker_group"] == group)
        jid = submit(api, ws, "def main():\n    return 1\n", new_tag)
        time.sleep(1)
        assert api.get(f"/api/w/{ws}/jobs_u/get/{jid}").json()["type"] == "QueuedJob"
        r = api.put(f"/api/configs/worker__{group}", json={"tags": [old_tag, new_tag]})
        assert r.status_code == 200, r.text
        j = wait_done(api, ws, jid, timeout=10)
        assert j["success"] and j["worker"] == name  # the same worker process, not a new one
        assert p.poll() is None
        w = next(w for w in api.get("/api/workers/list").json() if w["worker"] == name)
        assert w["tags"] == [old_tag, new_tag]  # re-registered with the new tags at once


# ---- 3. tags ----------------------------------------------------------------------------------

def test_tag_resolution_through_the_api(api, ws):
    def tag_of(jid: str) -> str:
        j = api.get(f"/api/w/{ws}/jobs_u/get/{jid}").json()
        api.post(f"/api/w/{ws}/jobs_u/queue/cancel/{jid}", json={})
        return j["tag"]

    never = "def main(**kw):\n    return 1\n"
    # the language's default
    r = api.post(f"/api/w/{ws}/jobs/run/preview", params={"scheduled_in_secs": 3600},
                 json={"content": never, "language": "python3"})
    assert tag_of(r.text) == "python3"
    r = api.post(f"/api/w/{ws}/jobs/run/preview", params={"scheduled_in_secs": 3600},
                 json={"content": "echo 1", "language": "bash"})
    assert tag_of(r.text) == "bash"
    # the script's tag, with $workspace and $args[name]
    assert api.post(f"/api/w/{ws}/scripts/create", json={
        "path": "t/tagged", "language": "python3", "content": never,
        "tag": "pool-$workspace-$args[region]"}).status_code == 201
    r = api.post(f"/api/w/{ws}/jobs/run/p/t/tagged", params={"scheduled_in_secs": 3600}, json={"region": "eu"})
    assert r.status_code == 201, r.text
    assert tag_of(r.text) == f"pool-{ws}-eu"
    # an explicit tag wins over the script's
    r = api.post(f"/api/w/{ws}/jobs/run/p/t/tagged", params={"tag": "explicit-$args[region]",
                                                            "scheduled_in_secs": 3600}, json={"region": "us"})
    assert tag_of(r.text) == "explicit-us"
    # a tag that refers to a missing argument is refused, saying which
    r = api.post(f"/api/w/{ws}/jobs/run/p/t/tagged", json={})
    assert r.status_code == 400 and "$args[region]" in r.json()["error"]


def test_split_tags():
    assert split_tags(["a", "gpu(ws1+ws2)", "b(x)"]) == (
        ["a", "gpu", "b"], ["a"], ["gpu(ws1)", "gpu(ws2)", "b(x)"])


def test_workspace_restricted_worker_tag(make_cluster):
    c = make_cluster()
    group, tag = uid("rt"), uid("gpuish")
    ws1, ws2, ws3 = uid("ws1"), uid("ws2"), uid("ws3")
    c.start_worker(name=group, tags=f"'{tag}({ws1}+{ws2})'")
    c.wait_workers(group)
    code = "def main():\n    return 'ok'\n"
    with c.client() as api:
        j3 = submit(api, ws3, code, tag)  # first in the queue, but not for this worker
        j1 = submit(api, ws1, code, tag)
        j2 = submit(api, ws2, code, tag)
        assert wait_done(api, ws1, j1)["success"] and wait_done(api, ws2, j2)["success"]
        time.sleep(1.5)
        q = api.get(f"/api/w/{ws3}/jobs_u/get/{j3}").json()
        assert q["type"] == "QueuedJob" and q["running"] is False
        assert f"no live worker serves tag '{tag}' (for workspace {ws3})" in q["waiting_reason"]
        assert api.post(f"/api/w/{ws3}/jobs_u/queue/cancel/{j3}", json={}).status_code == 200


async def test_waiting_reason_knows_restricted_worker_tags(pg_url):
    from sandmill.store import db as dbmod
    from sandmill.store import queue, workers

    conn = await dbmod.connect(pg_url)
    name, tag = uid("fake-worker"), uid("rt")
    try:
        await workers.register(conn, name=name, group="g", hostname="h", tags=[f"{tag}(wsa+wsb)", "x"],
                               backend="process", subworkers=1, info={})
        assert await queue.queued_tags_without_workers(conn, [tag], "wsa") == []
        assert await queue.queued_tags_without_workers(conn, [tag], "wsb") == []
        assert await queue.queued_tags_without_workers(conn, [tag], "wsc") == [tag]
        assert await queue.queued_tags_without_workers(conn, [tag + "x"], "wsa") == [tag + "x"]
    finally:
        await workers.unregister(conn, name)
        await conn.close()


# ---- 4. capabilities and the GPU guard ----------------------------------------------------------

def test_workers_advertise_capabilities_and_counters(make_cluster, ws):
    c = make_cluster()
    group, tag = uid("caps"), uid("caps")
    c.start_worker(name=group, tags=tag, subworkers=2, env={"SANDMILL_WORKER_PING_S": "0.5"})
    c.wait_workers(group)
    with c.client() as api:
        jid = submit(api, ws, "import time\ndef main():\n    time.sleep(1)\n    return 1\n", tag)
        wait_done(api, ws, jid)

        def mine():
            ws_ = [w for w in api.get("/api/workers/list").json() if w["worker_group"] == group]
            return ws_[0] if ws_ and ws_[0]["jobs_done"] >= 1 else None

        w = wait_until(mine, 10, "jobs_done to reach 1")
    import socket

    assert w["hostname"] == socket.gethostname() and w["tags"] == [tag]
    assert w["backend"] == "process" and w["subworkers"] == 2
    assert w["cpus"] == os.cpu_count() and w["memory_mb"] > 0 and isinstance(w["gpus"], list)
    assert w["version"] and w["last_ping"] and w["last_ping_s_ago"] < 5
    assert 0 <= w["occupancy"] <= 1 and w["busy"] in (0, 1)
    r = cli("workers", "--url", c.base, env={"SANDMILL_TOKEN": TOKEN, "COLUMNS": "400"})
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if w["worker"] in line)
    assert group in row and tag in row and "process" in row and "%" in row
    for col in ("ping s ago", "jobs", "occupancy"):
        assert col in r.stdout


GPU_PROFILE = "name: {name}\ntags: [{tag}]\nbackend: {{kind: process}}\nrequires_gpu: true\n"


@pytest.mark.skipif(bool(detect_gpus()), reason="this host has a GPU: the no-GPU guard cannot be shown here")
def test_gpu_group_refuses_a_host_without_gpu(make_cluster, tmp_path):
    c = make_cluster()
    group, tag = uid("gpu"), uid("gpu")
    prof = tmp_path / "gpu.yaml"
    prof.write_text(GPU_PROFILE.format(name=group, tag=tag))
    r = cli("worker", "--profile", str(prof), env={"DATABASE_URL": c.db_url})
    assert r.returncode == 2
    assert "requires a GPU" in r.stderr and "--allow-no-gpu" in r.stderr and "SANDMILL_ALLOW_NO_GPU" in r.stderr
    # told otherwise, by flag or by env, it starts
    c.spawn("worker", "--profile", str(prof), "--allow-no-gpu")
    c.spawn("worker", "--profile", str(prof), env={"SANDMILL_ALLOW_NO_GPU": "1"})
    c.wait_workers(group, count=2)


# ---- 7. init and periodic scripts --------------------------------------------------------------

def admin_jobs(api: httpx.Client, kind: str, worker_prefix: str) -> list[dict]:
    rows = api.get("/api/w/admins/jobs/list", params={"limit": 1000}).json()
    return [r for r in rows if r["kind"] == kind and r["tag"].startswith(f"{kind}-{worker_prefix}-")]


def test_init_script_runs_before_the_first_job(make_cluster, ws):
    c = make_cluster()
    group, tag = uid("init"), uid("init")
    with c.client() as api:
        jid = submit(api, ws, "def main():\n    return 1\n", tag)  # waiting before the worker starts
        c.start_worker(profile_text=(
            f"name: {group}\ntags: [{tag}]\nbackend: {{kind: process}}\n"
            "env: {GREETING: hello-from-init}\n"
            "init_script: |\n  echo \"$GREETING\"\n  sleep 1.5\n  echo prepared\n"))
        job = wait_done(api, ws, jid, timeout=30)
        inits = admin_jobs(api, "init", group)
        assert len(inits) == 1
        init = api.get(f"/api/w/admins/jobs_u/get/{inits[0]['id']}").json()
    assert init["type"] == "CompletedJob" and init["success"] is True and init["job_kind"] == "init"
    assert "hello-from-init" in init["logs"] and "prepared" in init["logs"]  # the group's env reached it
    assert init["result"] == "prepared" and init["worker"] == job["worker"]
    assert init["completed_at"] <= job["started_at"]


def test_an_init_script_printing_nul_and_binary_is_recorded_and_the_worker_serves(make_cluster, ws):
    """The group's own scripts print hostile bytes as jobs can: stored visibly, not fatal."""
    c = make_cluster()
    group, tag = uid("nulinit"), uid("nulinit")
    with c.client() as api:
        jid = submit(api, ws, "def main():\n    return 1\n", tag)
        c.start_worker(profile_text=(
            f"name: {group}\ntags: [{tag}]\nbackend: {{kind: process}}\n"
            "init_script: |\n  printf 'a\\000b\\377\\n'\n  printf 'last\\000line'\n"))
        job = wait_done(api, ws, jid, timeout=30)
        inits = admin_jobs(api, "init", group)
        init = api.get(f"/api/w/admins/jobs_u/get/{inits[0]['id']}").json()
    assert job["success"] is True
    assert init["success"] is True and "a\u2400b\ufffd" in init["logs"], init["logs"]
    assert init["result"] == "last\u2400line"


def test_failing_init_script_stops_the_worker_with_its_logs(make_cluster):
    c = make_cluster()
    group = uid("badinit")
    prof = c.tmp / f"{group}.yaml"
    prof.write_text(f"name: {group}\ntags: [{uid('t')}]\nbackend: {{kind: process}}\n"
                    "init_script: |\n  echo mounting the thing\n  echo no such thing >&2\n  exit 7\n")
    r = cli("worker", "--profile", str(prof), env={"DATABASE_URL": c.db_url})
    assert r.returncode == 3, r.stderr
    assert "init script failed" in r.stderr
    assert "mounting the thing" in r.stderr and "no such thing" in r.stderr
    with c.client() as api:
        (init,) = admin_jobs(api, "init", group)
        assert init["status"] == "failure"
        j = api.get(f"/api/w/admins/jobs_u/get/{init['id']}").json()
        assert "exited with code 7" in j["error"]
        assert "mounting the thing" in j["logs"]
        assert not [w for w in api.get("/api/workers/list").json() if w["worker_group"] == group]


def test_periodic_script_runs_every_interval(make_cluster):
    c = make_cluster()
    group = uid("periodic")
    c.start_worker(profile_text=(f"name: {group}\ntags: [{uid('t')}]\nbackend: {{kind: process}}\n"
                                 "periodic_script: echo tick\nperiodic_interval_s: 1\n"))
    c.wait_workers(group)
    with c.client() as api:
        runs = wait_until(lambda: (lambda r: r if len(r) >= 2 else None)(admin_jobs(api, "periodic", group)),
                          15, "two periodic runs")
        j = api.get(f"/api/w/admins/jobs_u/get/{runs[0]['id']}").json()
    assert all(r["status"] == "success" for r in runs)
    assert j["job_kind"] == "periodic" and "tick" in j["logs"] and j["workspace_id"] == "admins"
