"""FastAPI dependencies: the caller's identity and the app's shared state (``app.state``:
settings, pool, result waiters, set by the app factory), and job id parsing. The dependencies
are async: a sync one would cost each request a hop to the thread pool."""

from __future__ import annotations

import hmac
import uuid
from typing import Annotated

import asyncpg
from fastapi import Depends, HTTPException, Request

from .settings import ServerSettings
from .waiters import ResultWaiters


async def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


async def get_pool(request: Request) -> asyncpg.Pool:
    return request.app.state.pool


async def get_waiters(request: Request) -> ResultWaiters:
    return request.app.state.waiters


async def auth(request: Request) -> str:
    """The caller, from its bearer token (the admin token is the only one)."""
    h = request.headers.get("authorization", "")
    scheme, _, token = h.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip(), request.app.state.settings.admin_token):
        raise HTTPException(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})
    return "admin"


User = Annotated[str, Depends(auth)]
Pool = Annotated[asyncpg.Pool, Depends(get_pool)]
Settings = Annotated[ServerSettings, Depends(get_settings)]
Waiters = Annotated[ResultWaiters, Depends(get_waiters)]


# Called in the handler, not a dependency: a dependency's 404 would come before the
# endpoint's own 422s, and the order of errors is part of the API.
def job_uuid(id: str) -> uuid.UUID:
    try:
        return uuid.UUID(id)
    except ValueError:
        raise HTTPException(404, f"job {id} not found (not a job id)") from None
