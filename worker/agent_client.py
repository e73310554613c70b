"""An agent worker's HTTP client: every request retried with backoff and jitter while the
server is unreachable or answers 5xx, then ``AgentUnreachable`` (a ConnectionError, so
the worker's parts treat it as they treat a database outage: the claims, completions and
heartbeats try again); a refusal (4xx) raises ``AgentRefused`` at once.

A request that changes something (a claim, a completion) carries an Idempotency-Key, the
same on each retry: the server answers a request it has already served with the answer it
gave, so a retry after a lost answer claims nothing twice.

It also stands in for the worker's connection pool (``acquire``/``release``), so that the
parts that take a connection for a statement take this client instead."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
import uuid
from typing import Any

import httpx

from sandmill.store.wirejson import dumps, loads

log = logging.getLogger("sandmill.worker")


class AgentUnreachable(ConnectionError):
    """The server could not be reached, or answered 5xx, for longer than the retry time."""


class AgentTLSError(AgentUnreachable):
    """The server's certificate did not verify (not retried: a wrong CA stays wrong)."""


class AgentRefused(Exception):
    """The server refused the request (4xx): ``status`` and its message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class Backoff:
    """From ``first_s``, doubling up to ``max_s``, each wait drawn in [half, whole] (jitter:
    a fleet of agents does not come back in step after an outage)."""

    def __init__(self, first_s: float = 0.05, max_s: float = 2.0):
        self.first_s, self.max_s, self._next = first_s, max_s, first_s

    async def wait(self) -> None:
        await asyncio.sleep(self._next * random.uniform(0.5, 1.0))
        self._next = min(self.max_s, self._next * 2)


def tls_context(ca_file: str | None) -> ssl.SSLContext | bool:
    """Verify the server's certificate: against ``ca_file`` (a self-signed setup), else the
    system's CAs."""
    return ssl.create_default_context(cafile=ca_file) if ca_file else True


class AgentClient:
    """HTTP to the server's agent routes, with the agent token."""

    def __init__(self, url: str, token: str, *, ca_file: str | None = None, retry_s: float = 60.0):
        self.url = url.rstrip("/")
        self.retry_s = retry_s
        self.http = httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {token}",
                                        "Content-Type": "application/json"},
            timeout=httpx.Timeout(30.0, connect=5.0),
            # no Nagle: a request's head and body go out in two writes, and the second would
            # wait for the first's delayed ACK (40 ms on Linux) on every request
            transport=httpx.AsyncHTTPTransport(
                verify=tls_context(ca_file), socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
                limits=httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=60)))

    async def post(self, route: str, body: dict[str, Any], *, retry_s: float | None = None,
                   timeout: float | None = None, idempotent: bool = False) -> Any:
        """POST ``body`` to ``/api/agent_workers/<route>``; the answer's JSON. Retried for
        up to ``retry_s`` (default: the client's) while unreachable or 5xx."""
        headers = {"Idempotency-Key": uuid.uuid4().hex} if idempotent else None
        content = dumps(body)
        limit = self.retry_s if retry_s is None else retry_s
        t0, backoff = time.monotonic(), Backoff()
        while True:
            try:
                r = await self.http.post(f"/api/agent_workers/{route}", content=content, headers=headers,
                                         timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT)
            except httpx.TransportError as e:  # refused, cut, timed out: try again
                if _cert_failed(e):
                    raise AgentTLSError(f"{self.url}: the server's certificate did not verify ({e});"
                                        " give its CA with --ca-file") from None
                why = f"{type(e).__name__}: {e}"
            else:
                if r.status_code < 300:
                    return loads(r.content)
                if r.status_code < 500:
                    raise AgentRefused(r.status_code, _message(r))
                why = f"HTTP {r.status_code}: {_message(r)}"
            if time.monotonic() - t0 > limit:
                raise AgentUnreachable(f"{self.url} unreachable for {limit:.0f} s ({why})")
            log.debug("agent request %s failed (%s); retrying", route, why)
            await backoff.wait()

    # ---- the pool's protocol (batching.HotConns and the parts that take self.pool) ----

    async def acquire(self) -> AgentClient:
        return self

    async def release(self, _conn: Any) -> None:
        return None

    def is_closed(self) -> bool:
        return self.http.is_closed

    async def close(self) -> None:
        await self.http.aclose()


def _cert_failed(e: BaseException) -> bool:
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _message(r: httpx.Response) -> str:
    try:
        body = r.json()
        return str(body.get("error", body)) if isinstance(body, dict) else str(body)
    except ValueError:
        return r.text[:500]
