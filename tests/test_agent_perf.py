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
