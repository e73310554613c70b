"""JSON bytes between agents and servers: orjson where it is exact, the json module for
the rest. One module for both ends (the server and the agent worker import it)."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from typing import Any

import orjson

# orjson reads an integer past 64 bits as a float, silently losing digits: a body with a
# run of 19+ digits (maybe such an integer) is read by json, which keeps it exact.
_LONG_DIGITS = re.compile(rb"\d{19}")


def _default(o: Any) -> Any:
    if isinstance(o, uuid.UUID):
        return str(o)
    if isinstance(o, (dt.datetime, dt.date)):
        return o.isoformat()
    raise TypeError(f"{type(o).__name__} is not JSON")


def dumps(obj: Any) -> bytes:
    """JSON bytes: orjson (UUIDs and datetimes as ISO text), else the json module for
    what orjson refuses (an int over 64 bits, a key not a string)."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, default=_default, separators=(",", ":")).encode()


def loads(raw: bytes | str) -> Any:
    """Parse JSON exactly: orjson, unless the body may hold an integer past 64 bits or
    what only json reads (NaN, Infinity, 1e400)."""
    b = raw.encode() if isinstance(raw, str) else raw
    if _LONG_DIGITS.search(b):
        return json.loads(b)
    try:
        return orjson.loads(b)
    except orjson.JSONDecodeError:
        return json.loads(b)
