"""Hostile bytes: whatever a job prints or returns (NUL, invalid UTF-8, lone surrogates, a
line of megabytes, binary dumps) is stored and shown without harming anything, and the
worker that ran it goes on serving; args PostgreSQL cannot store are refused with a 422."""

from __future__ import annotations

import asyncio
import json
import tracemalloc
import uuid

import pytest

from sandmill.store import db as dbmod
from sandmill.worker.logs import MAX_LOG_BYTES, LogSink
from sandmill.store.storable import (
    MAX_RESULT_JSON_BYTES, NUL_SHOWN, decode_output, json_problem, storable_json, storable_text,
)
from support import wait_done

TRIVIAL = "def main():\n    return 'still here'\n"


def run(api, ws: str, content: str, language: str = "python3", timeout: float = 60) -> dict:
    r = api.post(f"/api/w/{ws}/jobs/run/preview", json={"content": content, "language": language,
                                                         "args": {}})
    assert r.status_code == 201, r.text
    return wait_done(api, ws, r.text, timeout)


def assert_ran_once_and_worker_serves(api, ws: str, j: dict) -> None:
    """The hostile job completed on its first run, and the same worker process (same
    name, still registered) serves the next job."""
    assert j["type"] == "CompletedJob" and j["restarts"] == 0, j
    assert "restart" not in j["logs"] and "WorkerDied" not in (j["error"] or "")
    listed = [x["id"] for x in api.get(f"/api/w/{ws}/jobs/list").json()]
    assert listed.count(j["id"]) == 1
    nxt = run(api, ws, TRIVIAL)
    assert nxt["success"] and nxt["result"] == "still here"
    assert nxt["worker"] == j["worker"]
    assert j["worker"] in [w["worker"] for w in api.get("/api/workers/list").json()]


def not_storable(j: dict) -> str:
    assert j["success"] is False, j
    err = j["result"]["error"]
    assert err["name"] == "ResultNotStorable", j
    assert j["error"] == f"ResultNotStorable: {err['message']}"
    return err["message"]


# ---- what PostgreSQL can hold: pure functions -------------------------------------------------

def test_storable_text_shows_nul_and_surrogates():
    assert storable_text("plain ✓") == "plain ✓"
    assert storable_text("a\x00b\ud800c") == f"a{NUL_SHOWN}b\ufffdc"
    assert decode_output(b"ok\x00\xff\xfe\x01") == f"ok{NUL_SHOWN}\ufffd\ufffd\x01"


def test_json_problem_names_what_and_where():
    assert json_problem({"a": [1, "x", None, 2.5], "b": {"c": True}}) is None
    assert json_problem({"a": [0, 1, "a\x00b"]}) == (
        "the result holds a NUL character at $.a[2]; PostgreSQL's JSON cannot store it")
    assert "a NUL character in a key at $[\"k\\u0000\"]" in json_problem({"k\x00": 1})
    assert "a lone surrogate (U+D800) at $" in json_problem("\ud800")
    assert "NaN at $.x" in json_problem({"x": float("nan")})
    assert "Infinity at $[1]" in json_problem([1, float("-inf")])
    # a backslash before u0000 in a string is no NUL: the fast check's false alarm, walked
    assert json_problem("\\u0000 NaN Infinity") is None
    big = "x" * (MAX_RESULT_JSON_BYTES + 1)
    assert "over the" in json_problem(big)
    deep: list = []
    for _ in range(900):
        deep = [deep]
    assert json_problem(deep) is None or "not JSON" in json_problem(deep)


def test_storable_json_for_sandmill_own_records():
    assert storable_json({"detail": "x\x00", "k\ud800": [float("nan"), "ok"]}) == {
        "detail": f"x{NUL_SHOWN}", "k\ufffd": [None, "ok"]}


# ---- logs: through a real LogSink into the real job_logs table -------------------------------

def test_log_sink_hundred_mb_line_bounded_and_storable(pg_url):
    """A 100 MB single line with NUL and invalid bytes: memory stays bounded, the first
    MAX_LOG_BYTES are stored (with the replacements), then the note."""

    async def go() -> tuple[str, int]:
        pool = await dbmod.create_pool(pg_url, min_size=1, max_size=2)
        job_id = uuid.uuid4()
        try:
            sink = LogSink(pool, job_id)
            chunk = (b"ab\x00\xff" * 16384)  # 64 KiB, no newline
            sink.on_output("stdout", b"first \xe2\x9c")  # a character split across chunks
            sink.on_output("stdout", b"\x93 line\n")
            tracemalloc.start()
            for _ in range(100 * 16):  # 100 MiB
                sink.on_output("stdout", chunk)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            sink.note("after the flood")
            await sink.close()
            rows = await pool.fetch("SELECT chunk FROM job_logs WHERE job_id = $1 ORDER BY id", job_id)
            return "".join(r["chunk"] for r in rows), peak
        finally:
            await pool.close()

    logs, peak = asyncio.run(go())
    assert peak < 3 * MAX_LOG_BYTES + 8 * 1024 * 1024, peak  # not the 100 MB
    assert logs.startswith("first ✓ line\n")
    assert f"ab{NUL_SHOWN}\ufffd" in logs and "\x00" not in logs
    body, _, notes = logs.partition("[sandmill]")
    assert MAX_LOG_BYTES - 8 <= len(body.encode()) <= MAX_LOG_BYTES + 1
    assert "[sandmill] after the flood" in logs
    assert logs.rstrip().endswith("more bytes of log not stored")


# ---- jobs through the real cluster --------------------------------------------------------

def test_python_result_with_nul(api, ws):
    j = run(api, ws, "def main():\n    return 'a\\x00b'\n")
    assert not_storable(j) == "the result holds a NUL character at $; PostgreSQL's JSON cannot store it"
    assert_ran_once_and_worker_serves(api, ws, j)


def test_python_result_with_nul_in_key(api, ws):
    j = run(api, ws, "def main():\n    return {'ok': [1], 'k\\x00': 1}\n")
    msg = not_storable(j)
    assert "a NUL character in a key" in msg and '$["k\\u0000"]' in msg
    assert_ran_once_and_worker_serves(api, ws, j)


def test_python_result_with_lone_surrogate(api, ws):
    j = run(api, ws, "def main():\n    return {'s': ['fine', '\\ud800']}\n")
    assert "a lone surrogate (U+D800) at $.s[1]" in not_storable(j)
    assert_ran_once_and_worker_serves(api, ws, j)


def test_python_result_written_by_the_job_itself(api, ws):
    """A job that writes result.json itself (NaN, a \\u0000 escape) and exits 0."""
    code = ("import os\ndef main():\n    open('result.json', 'w').write('{\"a\": [NaN, \"\\\\u0000\"]}')\n"
            "    os._exit(0)\n")
    j = run(api, ws, code)
    assert "NaN at $.a[0]" in not_storable(j)
    assert_ran_once_and_worker_serves(api, ws, j)


def test_python_error_text_with_nul_and_surrogate(api, ws):
    j = run(api, ws, "def main():\n    raise ValueError('bad\\x00byte \\ud800 here')\n")
    assert j["success"] is False
    assert j["result"]["error"]["name"] == "ValueError"
    assert j["error"] == f"ValueError: bad{NUL_SHOWN}byte \ufffd here"
    assert_ran_once_and_worker_serves(api, ws, j)


def test_python_prints_nul_and_binary(api, ws):
    code = ("import os, sys\ndef main():\n    print('x\\x00y')\n    sys.stdout.flush()\n"
            "    os.write(1, bytes(range(256)))\n    os.write(2, b'err\\x00\\xff\\n')\n    return 1\n")
    j = run(api, ws, code)
    assert j["success"] and j["result"] == 1, j
    assert f"x{NUL_SHOWN}y\n" in j["logs"] and f"err{NUL_SHOWN}\ufffd" in j["logs"]
    assert "\x00" not in j["logs"] and "\ufffd" in j["logs"]
    logs = api.get(f"/api/w/{ws}/jobs_u/get_logs/{j['id']}")
    assert logs.status_code == 200 and f"x{NUL_SHOWN}y" in logs.text
    assert_ran_once_and_worker_serves(api, ws, j)


def test_python_prints_environ_like_dump(api, ws):
    """/proc/self/environ's shape: NUL-separated, no newline, on stdout and stderr; the
    job exits 3, so the stderr tail goes into the error text."""
    code = ("import os, sys\ndef main():\n    data = open('/proc/self/environ', 'rb').read()\n"
            "    os.write(1, data + b'A=1\\x00B=\\xc3\\x28\\x00')\n    os.write(2, data + b'A=1\\x00')\n"
            "    os._exit(3)\n")
    j = run(api, ws, code)
    assert j["success"] is False and j["error"].startswith("ExitCode: exited with code 3: "), j
    assert "A=1" in j["error"] and NUL_SHOWN in j["error"]  # the stderr tail, shown
    assert f"A=1{NUL_SHOWN}B=\ufffd({NUL_SHOWN}" in j["logs"]
    assert "\\u0000" not in json.dumps(j)
    assert_ran_once_and_worker_serves(api, ws, j)


def test_bash_last_line_with_nul_and_invalid_bytes(api, ws):
    j = run(api, ws, "echo first\nprintf 'a\\000b\\377c\\n'\n", language="bash")
    assert j["success"] and j["result"] == f"a{NUL_SHOWN}b\ufffdc", j
    assert_ran_once_and_worker_serves(api, ws, j)


def test_bash_last_line_json_with_nul_escape_kept_as_text(api, ws):
    j = run(api, ws, "echo '{\"a\": \"x\\u0000y\"}'\n", language="bash")
    assert j["success"] and j["result"] == '{"a": "x\\u0000y"}', j
    assert_ran_once_and_worker_serves(api, ws, j)


def test_twenty_mb_single_line(api, ws):
    code = ("import os\ndef main():\n    for _ in range(20):\n        os.write(1, b'z' * 1024 * 1024)\n"
            "    return 'done'\n")
    j = run(api, ws, code, timeout=120)
    assert j["type"] == "CompletedJob"  # done, or killed at the output limit: either way, stored
    assert j["logs"].rstrip().endswith("more bytes of log not stored")
    assert len(j["logs"].encode()) < MAX_LOG_BYTES + 4096
    assert_ran_once_and_worker_serves(api, ws, j)


# ---- what comes in: 4xx with a message, never a 500 or a 503 ---------------------------------

@pytest.mark.parametrize("args, where", [
    ({"x": "a\u0000b"}, "args.x"),
    ({"k\u0000": 1}, 'args["k\\u0000"]'),
    ({"x": [1, {"y": "\ud800"}]}, "args.x[1].y"),
])
def test_preview_args_unstorable_422(api, ws, args, where):
    body = json.dumps({"content": TRIVIAL, "language": "python3", "args": args})  # \u escapes
    r = api.post(f"/api/w/{ws}/jobs/run/preview", content=body,
                 headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    assert where in r.json()["error"] and "PostgreSQL cannot store" in r.json()["error"]


def test_script_args_unstorable_422(api, ws):
    r = api.post(f"/api/w/{ws}/scripts/create", json={
        "path": "f/hostile/echo", "language": "python3", "content": "def main(x):\n    return x\n"})
    assert r.status_code == 201, r.text
    r = api.post(f"/api/w/{ws}/jobs/run/p/f/hostile/echo", json={"x": "a\u0000b"})
    assert r.status_code == 422 and "args.x" in r.json()["error"], r.text
    r = api.post(f"/api/w/{ws}/jobs/run_wait_result/p/f/hostile/echo",
                 content='{"x": "\\ud800"}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "lone surrogate" in r.json()["error"], r.text


def test_content_tag_path_with_nul_422(api, ws):
    r = api.post(f"/api/w/{ws}/jobs/run/preview",
                 json={"content": "echo a\u0000b", "language": "bash", "args": {}})
    assert r.status_code == 422 and "content" in r.json()["error"], r.text
    r = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": "bash\u0000x"},
                 json={"content": "echo hi", "language": "bash", "args": {}})
    assert r.status_code == 422 and "tag" in r.json()["error"], r.text
    r = api.post(f"/api/w/{ws}/scripts/create", json={
        "path": "f/x", "language": "bash", "content": "echo hi", "summary": "s\u0000"})
    assert r.status_code == 422 and "summary" in r.json()["error"], r.text
    r = api.post(f"/api/w/{ws}/jobs/run/p/f/a%00b", json={})
    assert r.status_code == 422 and "path" in r.json()["error"], r.text


@pytest.mark.parametrize("body", [b"{not json", b'{"content": "\xff\xfe", "language": "bash"}',
                                  b"\xff\xfe\x00\x00garbage"])
def test_bad_bodies_are_4xx_with_a_message(api, ws, body):
    for url in (f"/api/w/{ws}/jobs/run/preview", f"/api/w/{ws}/jobs/run/p/f/nothing"):
        r = api.post(url, content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (url, r.status_code, r.text)
        assert isinstance(r.json()["error"], str) and r.json()["error"]


def test_group_config_with_nul_422(api):
    r = api.put(f"/api/configs/worker__hostile{uuid.uuid4().hex[:6]}",
                json={"tags": ["a"], "env": {"X": "a\u0000b"}})
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["field"] == "env.X" and "NUL" in r.json()["error"]


def test_python_result_over_the_output_limit(api, ws):
    """A result.json cut at the output limit (8 MiB here) is named so, not "not valid JSON"."""
    j = run(api, ws, "def main():\n    return 'y' * (9 * 1024 * 1024)\n", timeout=120)
    assert "larger than the output limit" in not_storable(j)
    assert_ran_once_and_worker_serves(api, ws, j)
