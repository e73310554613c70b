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
