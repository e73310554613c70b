"""Health, version and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from sandmill.store import queue

from ..deps import Admin, Pool, User
from .errors import AUTHED

router = APIRouter(tags=["meta"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/api/version", response_class=PlainTextResponse, responses=AUTHED)
async def version(_u: User) -> str:
    return "sandmill 0.1.0"


@router.get("/metrics", response_class=PlainTextResponse, responses=AUTHED)
async def metrics(_u: Admin, pool: Pool) -> str:
    r = await queue.counts(pool)
    return "".join(f"sandmill_{k} {v}\n" for k, v in r.items())
