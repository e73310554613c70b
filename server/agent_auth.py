"""Agent tokens: signed claims that fix what an agent worker may run.

A token reads ``jwt_agent_<JWT>`` (Windmill's form): an HS256 JWT whose claims are the
worker group, its tags, the expiry (``exp``, unix seconds) and an id (``jti``). The secret
that signs them is kept in the database (``agent_key``), so every server of one database
accepts the same tokens. Nothing of an agent's request can widen its claims: the routes
read the group and tags from the token only.

Revoked tokens (``agent_token_blacklist``, by jti) are cached in memory and re-read every
``SANDMILL_AGENT_BLACKLIST_S`` (2 s): one statement per server per period, whatever the
number of agents, and a revocation holds within that period on every server (at once on
the server that took it)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import asyncpg
import jwt
from fastapi import HTTPException

from sandmill.store import agent as store_agent

log = logging.getLogger("sandmill.api")

PREFIX = "jwt_agent_"
ALGORITHM = "HS256"
BLACKLIST_EVERY_S = float(os.environ.get("SANDMILL_AGENT_BLACKLIST_S", 2))


@dataclass(frozen=True)
class AgentClaims:
    """What an agent token allows: one group, its tags, until ``exp``."""

    jti: str
    group: str
    tags: tuple[str, ...]
    exp: int

    @property
    def suffix(self) -> str:
        """What every worker name of this token ends with: the server holds an agent to
        the jobs of its own workers (a job is completed only by the name that holds it)."""
        return "@" + self.jti[:12]


def _unauthorized(msg: str) -> HTTPException:
    return HTTPException(401, msg, headers={"WWW-Authenticate": "Bearer"})


def make_token(secret: str, group: str, tags: list[str], exp: int) -> tuple[str, AgentClaims]:
    """A new agent token for ``group`` and ``tags``, expiring at ``exp`` (unix seconds)."""
    claims = AgentClaims(uuid.uuid4().hex, group, tuple(tags), int(exp))
    body = {"kind": "agent", "worker_group": group, "tags": list(tags), "exp": claims.exp,
            "iat": int(time.time()), "jti": claims.jti}
    return PREFIX + jwt.encode(body, secret, algorithm=ALGORITHM), claims


def decode(secret: str, token: str, *, verify_exp: bool = True) -> AgentClaims:
    """The claims of an agent token; 401 saying why for a token that is not one (not of
    this form, tampered, signed by another secret, expired)."""
    if not token.startswith(PREFIX):
        raise _unauthorized("not an agent token (they read jwt_agent_...: sandmill agent-token create)")
    try:
        body = jwt.decode(token[len(PREFIX):], secret, algorithms=[ALGORITHM],
                          options={"require": ["exp", "jti"], "verify_exp": verify_exp})
    except jwt.ExpiredSignatureError:
        raise _unauthorized("agent token expired") from None
    except jwt.InvalidTokenError as e:
        raise _unauthorized(f"invalid agent token ({e})") from None
    group, tags = body.get("worker_group"), body.get("tags")
    if (body.get("kind") != "agent" or not isinstance(group, str) or not isinstance(tags, list)
            or not all(isinstance(t, str) for t in tags) or not isinstance(body["jti"], str)):
        raise _unauthorized("invalid agent token (its claims are not an agent's)")
    return AgentClaims(body["jti"], group, tuple(tags), int(body["exp"]))


class AgentKeys:
    """The signing secret and the revoked tokens, as this server knows them."""

    def __init__(self, pool: asyncpg.Pool, refresh_s: float = BLACKLIST_EVERY_S):
        self.pool = pool
        self.refresh_s = refresh_s
        self.secret: str | None = None
        self.revoked: set[str] = set()
        self._read_at = 0.0
        self._lock = asyncio.Lock()
        self._checked: dict[str, AgentClaims] = {}  # token -> claims: jwt.decode costs ~30 us a request
        self.on_revoke: Callable[[], None] = lambda: None  # ends the long polls (they look again)

    async def load(self) -> None:
        """Read (or, on a new database, make) the secret, and the revoked tokens."""
        self.secret = await store_agent.secret(self.pool, secrets.token_urlsafe(48))
        await self.refresh()

    async def refresh(self) -> None:
        revoked = await store_agent.blacklisted(self.pool)
        added = revoked - self.revoked
        self.revoked, self._read_at = revoked, time.monotonic()
        if added:
            self.on_revoke()

    async def fresh(self) -> None:
        """Re-read the revoked tokens if the cache is older than ``refresh_s`` (one reader
        at a time; the others go on with the cache meanwhile, if they have one)."""
        if self.secret is None:
            async with self._lock:
                if self.secret is None:
                    await self.load()
            return
        # keep_fresh() reads them every refresh_s; a request reads them only when that
        # task is late (twice the period), not on top of it
        if time.monotonic() - self._read_at >= 2 * self.refresh_s and not self._lock.locked():
            async with self._lock:
                try:
                    await self.refresh()
                except Exception as e:  # noqa: BLE001 - the database is down: none can be revoked meanwhile
                    log.warning("revoked agent tokens not re-read (%s); the cache holds", e)
                    self._read_at = time.monotonic() - self.refresh_s + 1.0  # again in a second

    async def check(self, token: str) -> AgentClaims:
        """The claims of a valid, unrevoked agent token; else 401/403 saying why."""
        await self.fresh()
        claims = self._checked.get(token)
        if claims is None or claims.exp <= time.time():  # a signature checked once (per secret)
            claims = decode(self.secret, token)
            if len(self._checked) >= 4096:
                self._checked.clear()
            self._checked[token] = claims
        if claims.jti in self.revoked:
            raise HTTPException(403, f"agent token {claims.jti[:12]} (group {claims.group}) was revoked")
        return claims

    async def keep_fresh(self) -> None:
        """Re-read the revoked tokens every ``refresh_s``, for good (a revocation taken by
        another server ends this one's long polls too)."""
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - the requests' own fresh() tries again
                self._read_at = 0.0

    def is_revoked(self, claims: AgentClaims) -> bool:
        return claims.jti in self.revoked

    async def revoke(self, token: str) -> AgentClaims:
        """Revoke a token (expired ones too: they are refused anyway)."""
        await self.fresh()
        claims = decode(self.secret, token, verify_exp=False)
        exp = dt.datetime.fromtimestamp(claims.exp, dt.timezone.utc)
        await store_agent.blacklist(self.pool, claims.jti, claims.group, exp)
        self.revoked.add(claims.jti)
        self.on_revoke()
        return claims


def bearer(headers: Any) -> str:
    """The bearer token of a request, else 401."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <agent token>'")
    return token
