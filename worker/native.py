"""Native jobs, run in-process by the native group's subworkers: a PostgreSQL query and an
HTTP request. Each has a timeout, clear errors and a bound on the result size."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import asyncpg
import httpx

from .runtimes import JobResult

NATIVE_LANGUAGES = ("postgresql", "http", "sleep", "noop")
MAX_RESULT_BYTES = 4 * 1024 * 1024
_http: httpx.AsyncClient | None = None


class NativeError(Exception):
    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


async def run_native(job: dict[str, Any], timeout_s: float) -> JobResult:
    """Run one native job. Never raises for the job's own failure."""
    lang, args = job["language"], job["args"] or {}
    try:
        # asyncio.timeout, not wait_for: the job runs in the caller's task (3.11's wait_for
        # wraps it in a task of its own, one more task and two more loop turns per job)
        async with asyncio.timeout(timeout_s):
            result = await _RUNNERS[lang](job["content"], args)
        if result is not None:  # null needs no size check
            size = len(json.dumps(result, default=str))
            if size > MAX_RESULT_BYTES:
                raise NativeError("ResultTooLarge", f"result is {size} bytes; the limit is {MAX_RESULT_BYTES}")
        return JobResult("success", result, None)
    except TimeoutError:  # before OSError, of which it is a subclass
        return _fail("Timeout", f"timed out: wall-clock limit of {timeout_s:g} s reached")
    except NativeError as e:
        return _fail(e.name, str(e))
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as e:
        return _fail("PostgresError", f"{type(e).__name__}: {e}")
    except httpx.HTTPError as e:
        return _fail("HttpError", f"{type(e).__name__}: {e}")
    except (OSError, ValueError, TypeError) as e:
        return _fail(type(e).__name__, str(e))


def _fail(name: str, message: str) -> JobResult:
    return JobResult("failure", {"error": {"name": name, "message": message}}, f"{name}: {message}")


async def _postgresql(content: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    """``content`` is the query; ``args.database`` the DSN; ``args.params`` the $n values."""
    dsn = args.get("database")
    if not isinstance(dsn, str) or not dsn:
        raise NativeError("ArgumentError", "args.database must be a PostgreSQL connection URL")
    params = args.get("params", [])
    if not isinstance(params, list):
        raise NativeError("ArgumentError", "args.params must be a list (the $1, $2... values)")
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        rows = await conn.fetch(content, *params)
    finally:
        await conn.close()
    return [{k: _jsonable(v) for k, v in r.items()} for r in rows]


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str, list, dict)):
        return v
    if isinstance(v, (bytes, memoryview)):
        return base64.b64encode(bytes(v)).decode()
    return str(v)


async def _http_request(content: str, args: dict[str, Any]) -> dict[str, Any]:
    """``args``: method, url, headers, body (str or JSON). ``content`` may hold the URL."""
    global _http
    url = args.get("url") or content.strip()
    if not url.startswith(("http://", "https://")):
        raise NativeError("ArgumentError", f"args.url must be an http(s) URL, got {url!r}")
    method = str(args.get("method", "GET")).upper()
    body = args.get("body")
    if _http is None:
        _http = httpx.AsyncClient(follow_redirects=False)
    kw: dict[str, Any] = {"headers": args.get("headers") or {}}
    if isinstance(body, (dict, list)):
        kw["json"] = body
    elif body is not None:
        kw["content"] = str(body)
    async with _http.stream(method, url, **kw) as resp:
        chunks, size = [], 0
        async for chunk in resp.aiter_bytes():
            size += len(chunk)
            if size > MAX_RESULT_BYTES:
                raise NativeError("ResultTooLarge", f"response body over {MAX_RESULT_BYTES} bytes")
            chunks.append(chunk)
        raw = b"".join(chunks)
    try:
        text: Any = raw.decode()
    except UnicodeDecodeError:
        text = base64.b64encode(raw).decode()
    return {"status": resp.status_code, "headers": dict(resp.headers), "body": text}


async def _sleep(content: str, args: dict[str, Any]) -> None:
    """Sleeps ``args.seconds``: a job that costs the queue and the worker, not the CPU."""
    await asyncio.sleep(float(args.get("seconds", 0.1)))


async def _noop(content: str, args: dict[str, Any]) -> Any:
    return args.get("value")


_RUNNERS = {"postgresql": _postgresql, "http": _http_request, "sleep": _sleep, "noop": _noop}
