"""Autoscaling endpoints: the events (``GET /api/autoscaling/events?group=``) and the
groups with the count each was last asked for. The admin's only."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from sandmill.store import autoscale

from ..deps import Admin, Pool
from .errors import AUTHED

router = APIRouter(tags=["autoscaling"], responses=AUTHED)


def _iso(t: Any) -> str | None:
    return t.isoformat() if t is not None else None


@router.get("/api/autoscaling/events")
async def list_events(_u: Admin, pool: Pool, group: str | None = Query(None, max_length=200),
                      limit: int = Query(50, ge=1, le=1000)) -> list[dict[str, Any]]:
    """The latest autoscaling events, newest first, of one group or all."""
    rows = await autoscale.list_events(pool, group, limit)
    return [{**r, "created_at": _iso(r["created_at"])} for r in rows]


@router.get("/api/autoscaling/groups")
async def list_groups(_u: Admin, pool: Pool) -> list[dict[str, Any]]:
    """The autoscaled groups: enabled, the count last asked for, the last change."""
    rows = await autoscale.list_groups(pool)
    return [{**r, "last_change_at": _iso(r["last_change_at"])} for r in rows]
