"""The agent path's CPU savings keep its behaviour: orjson bodies fall back to the json
module for what orjson refuses, and a cached token check still refuses an expired token."""

import asyncio
import time
import uuid

import pytest
from fastapi import HTTPException

from sandmill.server.agent_auth import AgentKeys, make_token
from sandmill.server.agent_models import completions
from sandmill.store.wirejson import dumps, loads


def test_bodies_too_big_for_orjson_still_go_through():
    big = {"id": uuid.uuid4(), "result": {"n": 2 ** 70 + 1, "f": 1.5, "m": -(2 ** 64) - 3}}
    back = loads(dumps(big))  # exact: orjson alone would read these as floats
    assert back == {"id": str(big["id"]), "result": {"n": 2 ** 70 + 1, "f": 1.5, "m": -(2 ** 64) - 3}}
    assert type(back["result"]["n"]) is int and type(back["result"]["m"]) is int
    assert loads(b'{"x": NaN}')["x"] != loads(b'{"x": NaN}')["x"]  # json's NaN, not an error
    raw = dumps({"name": "w@abc", "done": [{"id": uuid.uuid4(), "status": "success", "result": 2 ** 70 + 1}]})
    _body, done = completions(raw)
    assert done[0].result == 2 ** 70 + 1 and type(done[0].result) is int


def test_a_cached_token_check_still_expires():
    keys = AgentKeys(pool=None)  # type: ignore[arg-type]
    keys.secret, keys._read_at = "s" * 48, time.monotonic() + 3600  # no database read
    token, _ = make_token(keys.secret, "g", ["t"], int(time.time()) + 2)
    assert asyncio.run(keys.check(token)).group == "g"
    assert asyncio.run(keys.check(token)).group == "g"  # the cached claims
    time.sleep(2.5)
    with pytest.raises(HTTPException) as e:
        asyncio.run(keys.check(token))
    assert e.value.status_code == 401 and "expired" in str(e.value.detail)


def test_job_rows_from_asyncpg_are_written_by_orjson(monkeypatch):
    """asyncpg's UUIDs are a subclass of uuid.UUID that orjson refuses without a default:
    every answer holding job rows went to the json module (a fifth of the server's CPU)."""
    import asyncpg.pgproto.pgproto as pgproto

    from sandmill.store import wirejson

    def no_json(*_a, **_k):
        raise AssertionError("went to the json module")

    monkeypatch.setattr(wirejson.json, "dumps", no_json)
    u = pgproto.UUID(uuid.uuid4().bytes)
    assert type(u) is not uuid.UUID
    assert loads(dumps({"jobs": [{"id": u, "args": {}}], "statuses": {str(u): "success"}})) == {
        "jobs": [{"id": str(u), "args": {}}], "statuses": {str(u): "success"}}
    monkeypatch.setattr(wirejson.json, "loads", no_json)
    with pytest.raises(AssertionError):  # a run of 19 digits: read by json (exact)
        loads(b'{"n": "x1234567890123456789"}')
    assert loads(b'{"n": 123456789012345678, "s": "a1b22c333"}') == {"n": 123456789012345678, "s": "a1b22c333"}


def test_completion_ids_read_as_text_and_other_spellings_agree(make_cluster, ws):
    """The fast reader keeps a job id as text (asyncpg sends it as a uuid); an id spelled
    otherwise (upper case) is read by the model as a UUID: both complete, acknowledge and
    refuse alike, and the answer names each job by its canonical text."""
    from agent_support import agent_name, agent_token, as_agent, push

    c = make_cluster()
    tag = "txt" + uuid.uuid4().hex[:8]
    token = agent_token(c, "edge", [tag])
    name = agent_name(token)
    a_id, b_id, other = push(c, ws, tag), push(c, ws, tag), push(c, ws, tag)
    done = {"status": "success", "result": 1, "duration_ms": 1}
    with as_agent(c, token) as a:
        assert a.post("/register", json={"name": name, "group": "edge", "tags": [tag]}).status_code == 200
        got = [j["id"] for j in a.post("/pull_job", json={"name": name, "n": 2}).json()["jobs"]]
        assert sorted(got) == sorted([a_id, b_id])
        r = a.post("/complete", json={"name": name, "done": [{"id": a_id, **done}]}).json()
        assert r["statuses"] == {a_id: "success"} and r["acked"] == [] and r["refused"] == []
        r = a.post("/complete", json={"name": name, "done": [{"id": b_id.upper(), **done}]}).json()
        assert r["statuses"] == {b_id: "success"} and r["acked"] == [] and r["refused"] == []
        r = a.post("/complete", json={"name": name, "done": [
            {"id": a_id, **done}, {"id": b_id.upper(), **done}, {"id": other.upper(), **done}]}).json()
        assert r["statuses"] == {} and r["acked"] == [a_id, b_id] and r["refused"] == [other], r
        r = a.post("/complete", json={"name": name, "done": [{"id": a_id, **done}, {"id": other, **done}]}).json()
        assert r["acked"] == [a_id] and r["refused"] == [other], r
        bad = a.post("/complete", json={"name": name, "done": [{"id": "not-a-uuid", **done}]})
        assert bad.status_code == 422 and "error" in bad.json(), bad.text


def test_claim_ahead_is_capped_to_what_a_completion_request_carries(monkeypatch, tmp_path):
    """8 slots holding 128 each asked for 1,024 jobs ahead in one completion: over the
    body's 1,000, refused, and the agent ran job by job (86 jobs/s against 3,300)."""
    from sandmill.profiles import Profile
    from sandmill.server.agent_auth import make_token
    from sandmill.worker.agent_worker import AgentWorker
    from sandmill.worker.settings import WorkerSettings

    token, _ = make_token("s" * 48, "g", ["t"], int(time.time()) + 600)
    profile = Profile.model_validate({"name": "g", "tags": ["t"], "native": True, "subworkers": 8})
    monkeypatch.setenv("SANDMILL_CLAIM_AHEAD_MAX", "128")
    w = AgentWorker(profile, "http://127.0.0.1:1", token, data_dir=tmp_path, settings=WorkerSettings())
    assert w.settings.claim_ahead_max == 62
    monkeypatch.delenv("SANDMILL_CLAIM_AHEAD_MAX")
    w2 = AgentWorker(profile, "http://127.0.0.1:1", token, data_dir=tmp_path, settings=WorkerSettings())
    assert w2.settings.claim_ahead_max == 32  # the agents' default, under the cap
    asyncio.run(w.client.close())
    asyncio.run(w2.client.close())
