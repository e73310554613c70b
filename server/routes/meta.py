"""Health, version and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from .. import metrics as prom
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
async def metrics(_u: Admin, pool: Pool, request: Request) -> Response:
    """Prometheus metrics (text exposition format), read from the database per scrape
    (server/metrics.py)."""
    return Response(await prom.render(request.app.state, pool), media_type=CONTENT_TYPE_LATEST)
