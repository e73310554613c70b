"""The fast path of the hottest routes: ``POST /api/w/{ws}/jobs/run/preview`` (and
``run_wait_result/preview``, ``run_inline/preview``) answered without FastAPI's
per-request machinery (routing through every route, the dependency
tree, the parameter models, the middleware layers): two fifths of the server's CPU per
submit went there (docs/performance.md, "The server's and PostgreSQL's share per job").

Only the plain, valid request is taken: no query string, ``Content-Type:
application/json``, a body that the same ``Preview`` model accepts, a token that may run
jobs in the workspace, a job that ``preview_job``'s checks accept. It runs the same
functions the route runs (``deps.auth``, ``Preview``, ``submit.preview_job``,
``submit_batch.push``, ``submit.push_and_wait``) and answers what the route answers (201,
the job id as text/plain; the waiting routes: the job's result, 400, 408).
Anything else (a bad token, a bad body, a parameter, an error before the insert) goes to
FastAPI unchanged, the body replayed, and gets its answer there, word for word. An error
of the insert itself is answered by the app's own exception handler for it.
``SANDMILL_FAST_SUBMIT=0`` turns it off (before/after runs)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import submit_batch
from .deps import _check_scope, auth
from .models import Preview
from .submit import preview_job, push_and_wait

ENABLED = os.environ.get("SANDMILL_FAST_SUBMIT", "1") != "0"
answered = 0  # requests the fast path answered itself (tests, measurements)
_PATH = re.compile(r"/api/w/([^/]+)/jobs/(run|run_wait_result|run_inline)/preview")
MAX_BODY = 1 << 20  # a larger body goes the usual way (read in full here before any check)
_HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


class _NotHere(Exception):
    """The request is not the plain case: FastAPI answers it."""


class FastSubmit:
    """ASGI middleware in front of the app's router (see the module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] != "POST" or scope["query_string"]
                or (m := _PATH.fullmatch(scope["path"])) is None or not _json_body(scope)):
            await self.app(scope, receive, send)
            return
        messages, body = await _read_body(receive)
        if body is None:
            await self.app(scope, _replay(messages, receive), send)
            return
        request = Request(scope)
        wait = m.group(2) != "run"
        try:
            job = await _checked(request, m.group(1), body, wait)
        except Exception:  # noqa: BLE001 - not the plain case: FastAPI's answer, word for word
            await self.app(scope, _replay(messages, receive), send)
            return
        app = scope["app"]
        global answered
        try:
            if wait:  # as run_wait_preview: the waiter first, then the insert, then the result
                st = app.state
                response = await push_and_wait(
                    st.pool, st.waiters, job["workspace"],
                    lambda jid: submit_batch.push(st.pool, **{**job, "job_id": jid}),
                    st.settings.wait_timeout_s)
            else:
                job_id = await submit_batch.push(app.state.pool, **job)
        except Exception as e:  # the insert's own fault, a 408: the app's handler answers it, as on the route
            handler = _handler_for(app, e)
            if handler is None:
                raise
            answered += 1
            response = await handler(request, e)
            await response(scope, receive, send)
            return
        answered += 1
        if wait:
            await response(scope, receive, send)
            return
        text = str(job_id).encode()
        await send({"type": "http.response.start", "status": 201,
                    "headers": [(b"content-length", str(len(text)).encode()), *_HEADERS]})
        await send({"type": "http.response.body", "body": text})


def _json_body(scope: Scope) -> bool:
    """Exactly one Content-Type header, and it is application/json."""
    found = [v for k, v in scope["headers"] if k == b"content-type"]
    return found == [b"application/json"]


async def _read_body(receive: Receive) -> tuple[list[Message], bytes | None]:
    """The request's messages as received, and its body (None: a disconnect, or a body
    over MAX_BODY, which the usual path reads on from the messages kept)."""
    messages: list[Message] = []
    size = 0
    while True:
        msg = await receive()
        messages.append(msg)
        if msg["type"] != "http.request":
            return messages, None
        size += len(msg.get("body", b""))
        if size > MAX_BODY:
            return messages, None
        if not msg.get("more_body", False):
            return messages, b"".join(m.get("body", b"") for m in messages)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A receive that gives the messages already read first, then the real ones."""
    pending = list(messages)

    async def again() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()
    return again


async def _checked(request: Request, ws: str, body: bytes, wait: bool) -> dict[str, Any]:
    """``push``'s keywords for the request, as the route would queue it; raises for
    anything but the plain case."""
    u = await auth(request)  # the route's dependencies: the caller, then in_workspace's checks
    if not u.sees(ws):
        raise _NotHere()
    _check_scope(u, "jobs:run")
    try:
        obj = json.loads(body)  # as FastAPI reads a JSON body (Request.json)
        preview = Preview.model_validate(obj)
    except (ValueError, ValidationError):
        raise _NotHere() from None
    return preview_job(ws, preview, None, 0, None, wait=wait, created_by=u.name)


def _handler_for(app: Any, exc: Exception) -> Any:
    """The app's exception handler for ``exc`` (by its class's MRO), as Starlette's
    ExceptionMiddleware finds it."""
    handlers = app.exception_handlers
    for cls in type(exc).__mro__:
        if cls is Exception:  # the 500 handler's key: ServerErrorMiddleware's, not ours
            return None
        if cls in handlers:
            return handlers[cls]
    return None


def install(app: Any) -> None:
    """Put the fast path in front of ``app``'s routes (unless SANDMILL_FAST_SUBMIT=0)."""
    if ENABLED:
        app.add_middleware(FastSubmit)
