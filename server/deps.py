"""FastAPI dependencies: the caller's identity and what it may do (the admin token, or a
workspace token with scopes), the app's shared state (``app.state``: settings, pool,
result waiters, set by the app factory), and job id parsing. The dependencies are async: a
sync one would cost each request a hop to the thread pool."""

from __future__ import annotations

import datetime as dt
import hmac
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Callable

import asyncpg
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from sandmill.store import tokens

from .settings import ServerSettings
from .waiters import ResultWaiters

# What a workspace token may be given; a token gets all of them unless told otherwise.
WORKSPACE_SCOPES = ("jobs:run", "jobs:read", "jobs:cancel", "scripts:read", "scripts:write")


async def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


async def get_pool(request: Request) -> asyncpg.Pool:
    return request.app.state.pool


async def get_waiters(request: Request) -> ResultWaiters:
    return request.app.state.waiters


@dataclass(frozen=True)
class Principal:
    """Who calls: the admin (every workspace, every route), or a workspace token."""
    admin: bool
    label: str = "admin"
    prefix: str | None = None
    workspace: str | None = None
    scopes: tuple[str, ...] = ()
    expires_at: dt.datetime | None = None

    @property
    def name(self) -> str:
        """What a job's ``created_by`` and a cancel's ``canceled_by`` record."""
        return "admin" if self.admin else f"{self.label}/{self.prefix}"

    def sees(self, ws: str) -> bool:
        return self.admin or self.workspace == ws

    def __str__(self) -> str:  # the routes pass the caller where a name is wanted
        return self.name


ADMIN = Principal(admin=True)


def _unauthorized(msg: str) -> HTTPException:
    return HTTPException(401, msg, headers={"WWW-Authenticate": "Bearer"})


# Declares the bearer scheme in the OpenAPI document; auth() answers a missing token itself.
_BEARER = HTTPBearer(auto_error=False, description="the admin token, or a workspace token")


async def auth(request: Request,
               _declared: Annotated[HTTPAuthorizationCredentials | None, Depends(_BEARER)] = None,
               ) -> Principal:
    """The caller, from its bearer token: the admin token (no database read), else one
    primary-key lookup of a workspace token (no cache: a revocation holds at once)."""
    h = request.headers.get("authorization", "")
    scheme, _, token = h.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized("missing bearer token: send 'Authorization: Bearer <token>'")
    if hmac.compare_digest(token.encode(), request.app.state.settings.admin_token.encode()):
        return ADMIN
    row = await tokens.authenticate(request.app.state.pool, token)
    if row is None:
        raise _unauthorized("invalid token (unknown, malformed or revoked)")
    if row["expired"]:
        raise _unauthorized(f"token {row['label']!r} ({row['prefix']}) expired at"
                            f" {row['expires_at'].isoformat()}")
    return Principal(admin=False, label=row["label"], prefix=row["prefix"],
                     workspace=row["workspace"], scopes=tuple(row["scopes"]),
                     expires_at=row["expires_at"])


User = Annotated[Principal, Depends(auth)]


async def admin_only(u: User) -> Principal:
    """The admin token, else 403: worker configs, workers, metrics and tokens are the admin's."""
    if not u.admin:
        raise HTTPException(403, f"this route needs the admin token; token {u.label!r} ({u.prefix})"
                                 f" is for workspace {u.workspace!r} only")
    return u


class _Nothing:
    """An executor on which every lookup finds nothing: another workspace's job or script,
    looked up with a workspace token, answers the route's own 404, word for word."""

    async def fetchrow(self, *_a: Any) -> None:
        return None

    async def fetchval(self, *_a: Any) -> None:
        return None

    async def fetch(self, *_a: Any) -> list:
        return []


NOTHING: Any = _Nothing()


def _check_scope(u: Principal, scope: str) -> None:
    if not u.admin and scope not in u.scopes:
        raise HTTPException(403, f"token {u.label!r} ({u.prefix}) lacks the scope {scope!r} this"
                                 f" route needs (it has: {', '.join(u.scopes) or 'none'})")


def lookup(scope: str) -> Callable[..., Any]:
    """For a route that looks up a job or script of ``ws``: the executor to look it up on
    (the pool; for another workspace's token, NOTHING, so it answers the route's 404);
    403 when the token lacks ``scope``."""

    async def dep(ws: str, u: User, request: Request) -> Any:
        if not u.sees(ws):
            return NOTHING
        _check_scope(u, scope)
        return request.app.state.pool

    return dep


def in_workspace(scope: str) -> Callable[..., Any]:
    """For a route that writes to or lists ``ws``: the caller; 404 for another workspace's
    token (the same answer for every workspace not its own), 403 when it lacks ``scope``."""

    async def dep(ws: str, u: User) -> Principal:
        if not u.sees(ws):
            raise HTTPException(404, f"workspace {ws} not found")
        _check_scope(u, scope)
        return u

    return dep


Admin = Annotated[Principal, Depends(admin_only)]
Pool = Annotated[asyncpg.Pool, Depends(get_pool)]
Settings = Annotated[ServerSettings, Depends(get_settings)]
Waiters = Annotated[ResultWaiters, Depends(get_waiters)]
ReadJobs = Annotated[Any, Depends(lookup("jobs:read"))]
CancelJobs = Annotated[Any, Depends(lookup("jobs:cancel"))]
RunStored = Annotated[Any, Depends(lookup("jobs:run"))]
ReadScripts = Annotated[Any, Depends(lookup("scripts:read"))]
RunJobs = Annotated[Principal, Depends(in_workspace("jobs:run"))]
ListJobs = Annotated[Principal, Depends(in_workspace("jobs:read"))]
ListScripts = Annotated[Principal, Depends(in_workspace("scripts:read"))]
WriteScripts = Annotated[Principal, Depends(in_workspace("scripts:write"))]


# Called in the handler, not a dependency: a dependency's 404 would come before the
# endpoint's own 422s, and the order of errors is part of the API.
def job_uuid(id: str) -> uuid.UUID:
    try:
        return uuid.UUID(id)
    except ValueError:
        raise HTTPException(404, f"job {id} not found (not a job id)") from None
