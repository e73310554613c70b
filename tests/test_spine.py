"""The spine end to end: submit over HTTP -> PostgreSQL queue -> worker -> result."""

from __future__ import annotations

import time

import pytest

from support import wait_done

PY_HELLO = '''
import sys
def main(name="world", n=1):
    print("hello", name)
    print("warn", file=sys.stderr)
    return {"greeting": "hi " + name, "double": n * 2}
'''


def preview(api, ws, content, language="python3", args=None, **params):
    r = api.post(f"/api/w/{ws}/jobs/run/preview", json={"content": content, "language": language,
                                                         "args": args or {}}, params=params)
    assert r.status_code == 201, r.text
    return r.text


def test_python_job_result_and_logs(api, ws):
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/preview",
                 json={"content": PY_HELLO, "language": "python3", "args": {"name": "ann", "n": 21}})
    assert r.status_code == 200, r.text
    assert r.json() == {"greeting": "hi ann", "double": 42}
    job_id = r.headers["x-sandmill-job-id"]
    logs = api.get(f"/api/w/{ws}/jobs_u/get_logs/{job_id}").text
    assert logs.index("hello ann") < logs.index("warn")


def test_run_inline_preview_answers_like_run_wait_result(api, ws):
    r = api.post(f"/api/w/{ws}/jobs/run_inline/preview",
                 json={"content": "def main(x):\n    return x + 1\n", "language": "python3", "args": {"x": 1}})
    assert r.status_code == 200 and r.json() == 2


def test_bash_positional_args_and_last_line(api, ws):
    script = 'first="$1"\nsecond="${2:-dflt}"\necho "log line"\necho "{\\"a\\": \\"$first\\", \\"b\\": \\"$second\\"}"\n'
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/preview",
                 json={"content": script, "language": "bash", "args": {"second": "two", "first": "one"}})
    assert r.status_code == 200, r.text
    assert r.json() == {"a": "one", "b": "two"}


def test_job_record_shapes(api, ws):
    job_id = preview(api, ws, PY_HELLO, args={"name": "x"})
    assert len(job_id) == 36  # plain-text uuid, not JSON
    j = wait_done(api, ws, job_id)
    assert j["type"] == "CompletedJob" and j["success"] is True
    assert j["result"] == {"greeting": "hi x", "double": 2}
    for field in ("running", "logs", "tag", "worker", "started_at", "duration_ms", "mem_peak"):
        assert field in j, field
    assert j["tag"] == "python3" and j["worker"].startswith("default-")
    assert j["duration_ms"] > 0 and "hello x" in j["logs"]
    assert j["outcome"]["status"] == "success"
    assert j["outcome"]["warm"] is True  # forked from the worker's warm interpreter
    m = api.get(f"/api/w/{ws}/jobs_u/completed/get_result_maybe/{job_id}").json()
    assert m == {"started": True, "completed": True, "success": True, "result": {"greeting": "hi x", "double": 2}}
    assert api.get(f"/api/w/{ws}/jobs_u/completed/get_result/{job_id}").json() == {"greeting": "hi x", "double": 2}
    listed = api.get(f"/api/w/{ws}/jobs/list").json()
    assert [x["id"] for x in listed] == [job_id]


def test_scripts_create_get_run_by_path_and_hash(api, ws):
    r = api.post(f"/api/w/{ws}/scripts/create", json={
        "path": "f/demo/add", "language": "python3", "content": "def main(a, b):\n    return a + b\n",
        "summary": "adds"})
    assert r.status_code == 201, r.text
    h = r.text
    s = api.get(f"/api/w/{ws}/scripts/get/p/f/demo/add").json()
    assert s["hash"] == h and s["language"] == "python3" and s["summary"] == "adds"
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/p/f/demo/add", json={"a": 2, "b": 3})
    assert r.status_code == 200 and r.json() == 5
    jid = api.post(f"/api/w/{ws}/jobs/run/h/{h}", json={"a": 1, "b": 1}).text
    j = wait_done(api, ws, jid)
    assert j["result"] == 2 and j["script_path"] == "f/demo/add" and j["script_hash"] == h


def test_queued_job_shape_and_cancel_at_once(api, ws):
    jid = preview(api, ws, "def main():\n    return 1\n", tag="nobody-serves-this")
    j = api.get(f"/api/w/{ws}/jobs_u/get/{jid}").json()
    assert j["type"] == "QueuedJob" and j["running"] is False
    assert "no live worker serves tag 'nobody-serves-this'" in j["waiting_reason"]
    m = api.get(f"/api/w/{ws}/jobs_u/completed/get_result_maybe/{jid}").json()
    assert m == {"started": False, "completed": False, "success": None, "result": None}
    r = api.post(f"/api/w/{ws}/jobs_u/queue/cancel/{jid}", json={"reason": "changed my mind"})
    assert r.status_code == 200 and "canceled" in r.text
    j = api.get(f"/api/w/{ws}/jobs_u/get/{jid}").json()
    assert j["type"] == "CompletedJob" and j["canceled"] is True and j["success"] is False
    assert j["canceled_reason"] == "changed my mind"


def test_cancel_running_job_within_a_second_or_so(api, ws):
    jid = preview(api, ws, "import time\ndef main():\n    print('started', flush=True)\n    time.sleep(60)\n")
    deadline = time.time() + 20
    while api.get(f"/api/w/{ws}/jobs_u/get/{jid}").json().get("running") is not True:
        assert time.time() < deadline
        time.sleep(0.05)
    t0 = time.time()
    assert api.post(f"/api/w/{ws}/jobs_u/queue/cancel/{jid}", json={}).status_code == 200
    j = wait_done(api, ws, jid, timeout=10)
    assert time.time() - t0 < 2.5
    assert j["canceled"] is True and j["success"] is False


def test_limits_reach_the_user_in_words(api, ws):
    r = api.post(f"/api/w/{ws}/scripts/create", json={
        "path": "slow", "language": "python3", "timeout": 1,
        "content": "import time\ndef main():\n    time.sleep(30)\n"})
    assert r.status_code == 201
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/p/slow", json={})
    assert r.status_code == 400
    assert "wall-clock limit of 1 s" in r.json()["error"]["message"]


@pytest.mark.parametrize("body,status,needle", [
    ({"content": "x", "language": "cobol"}, 400, "unknown language 'cobol'"),
    ({"content": "def main(:\n  pass\n", "language": "python3"}, 400, "line 1"),
    ({"content": "x = 1\n\n\ndef mian():\n    pass\n", "language": "python3"}, 400, "no main"),
    ({"content": "def main():\n  pass\n", "language": "python3", "args": [1, 2]}, 422, "args"),
    ({"language": "python3"}, 422, "content"),
])
def test_bad_input_gets_clear_4xx(api, ws, body, status, needle):
    r = api.post(f"/api/w/{ws}/jobs/run/preview", json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_bad_runtime_results_fail_clearly(api, ws):
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/preview", json={
        "content": "def main():\n    return object()\n", "language": "python3"})
    assert r.status_code == 400 and r.json()["error"]["name"] == "ResultNotSerializable"
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/preview", json={
        "content": "def main():\n    return [float('nan')]\n", "language": "python3"})
    assert r.status_code == 400 and r.json()["error"]["name"] == "ResultNotSerializable"
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/preview", json={
        "content": "def main():\n    x = []\n    x.append(x)\n    return x\n", "language": "python3"})
    assert r.status_code == 400 and r.json()["error"]["name"] == "ResultNotSerializable"
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/preview", json={
        "content": "def main():\n    raise ValueError('boom')\n", "language": "python3"})
    assert r.status_code == 400 and r.json()["error"] == {
        "name": "ValueError", "message": "boom", "stack": r.json()["error"]["stack"]}
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/preview", json={
        "content": "def main(a):\n    return a\n", "language": "python3", "args": {"zzz": 1}})
    assert r.status_code == 400 and r.json()["error"]["name"] == "ArgumentError"
    # the worker is still fine afterwards
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/preview", json={
        "content": "def main():\n    return 'ok'\n", "language": "python3"})
    assert r.status_code == 200 and r.json() == "ok"


def test_unknown_things_are_404(api, ws):
    assert api.post(f"/api/w/{ws}/jobs/run/p/no/such/script", json={}).status_code == 404
    assert api.get(f"/api/w/{ws}/scripts/get/p/nope").status_code == 404
    for bad in ("00000000-0000-0000-0000-000000000000", "not-a-uuid"):
        r = api.get(f"/api/w/{ws}/jobs_u/get/{bad}")
        assert r.status_code == 404 and "not found" in r.json()["error"]
    assert api.post(f"/api/w/{ws}/jobs/run/p/x", content=b"{not json").status_code in (404, 422)


def test_malformed_body_names_the_field(api, ws):
    r = api.post(f"/api/w/{ws}/scripts/create", json={"path": "a", "language": "python3", "content": 5})
    assert r.status_code == 422 and "content" in r.json()["error"]
    r = api.post(f"/api/w/{ws}/scripts/create", json={"path": "a b", "language": "python3", "content": ""})
    assert r.status_code == 422 and "path" in r.json()["error"]


def test_auth_on_every_route_but_health(cluster, ws):
    import httpx

    assert httpx.get(cluster.base + "/health").status_code == 200
    r = httpx.get(cluster.base + f"/api/w/{ws}/jobs/list")
    assert r.status_code == 401 and "bearer" in r.json()["error"].lower()
    r = httpx.get(cluster.base + f"/api/w/{ws}/jobs/list", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(cluster.base + "/docs").status_code == 200
    assert "/api/w/{ws}/jobs/run/preview" in httpx.get(cluster.base + "/openapi.json").json()["paths"]


def test_native_jobs(api, ws, pg_url):
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/preview", json={
        "content": "SELECT $1::int + 1 AS n, 'x' AS s", "language": "postgresql",
        "args": {"database": pg_url, "params": [41]}})
    assert r.status_code == 200, r.text
    assert r.json() == [{"n": 42, "s": "x"}]
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/preview", json={
        "content": "SELEC nonsense", "language": "postgresql", "args": {"database": pg_url}})
    assert r.status_code == 400 and r.json()["error"]["name"] == "PostgresError"


def test_logs_stream_while_running(api, ws):
    code = "import time\ndef main():\n    print('first', flush=True)\n    time.sleep(3)\n    print('second')\n"
    jid = preview(api, ws, code)
    deadline = time.time() + 15
    while "first" not in api.get(f"/api/w/{ws}/jobs_u/get_logs/{jid}").text:
        assert time.time() < deadline, "logs did not stream"
        time.sleep(0.1)
    j = api.get(f"/api/w/{ws}/jobs_u/get/{jid}").json()
    assert j["type"] == "QueuedJob" and j["running"] is True and "second" not in j["logs"]
    assert "second" in wait_done(api, ws, jid)["logs"]
