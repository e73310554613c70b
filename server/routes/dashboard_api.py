"""The JSON the web dashboard reads that the other routes do not give: the overview (queue
per tag, throughput, workers per group), the workers with their running jobs and init
runs, a paged job list across workspaces, the group names. The admin's only."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query

from sandmill.store import dashboard, workers

from ..deps import Admin, Pool
from ..views import _iso, _worker_json
from .errors import AUTHED, error
from .workers import group_of

router = APIRouter(prefix="/api/dashboard", tags=["dashboard"], responses=AUTHED)

DEAD_AFTER_S = 60.0   # no ping for this long: flagged dead (the API's 'alive' is the same 60 s)
SHOWN_FOR_S = 600.0   # dead workers stay on the page this long


def _row(r: dict[str, Any]) -> dict[str, Any]:
    out = {k: _iso(v) for k, v in r.items()}
    if "id" in out:
        out["id"] = str(r["id"])
    return out


@router.get("/overview")
async def overview(_u: Admin, pool: Pool) -> dict[str, Any]:
    """Jobs waiting and running per tag with the oldest wait, completed jobs per minute over
    the last hour, and workers alive per group."""
    ws = await workers.list_workers(pool, SHOWN_FOR_S)
    groups: dict[str, dict[str, Any]] = {}
    for w in ws:
        g = groups.setdefault(w["worker_group"], {"group": w["worker_group"], "alive": 0, "dead": 0,
                                                  "subworkers": 0, "busy": 0})
        if w["last_ping_s_ago"] > DEAD_AFTER_S:
            g["dead"] += 1
        else:
            g["alive"] += 1
            g["subworkers"] += w["subworkers"]
            g["busy"] += w["busy"]
    return {"queue": await dashboard.queue_by_tag(pool),
            "throughput": await dashboard.throughput(pool, 3600),
            "groups": sorted(groups.values(), key=lambda g: g["group"])}


@router.get("/workers")
async def workers_page(_u: Admin, pool: Pool) -> dict[str, Any]:
    """Every worker that pinged in the last 10 minutes (dead ones flagged), with its running
    jobs and its last init script run."""
    ws = await workers.list_workers(pool, SHOWN_FOR_S)
    names = [w["name"] for w in ws]
    running: dict[str, list[dict[str, Any]]] = {}
    for r in await dashboard.running_jobs_of(pool, names):
        running.setdefault(r["worker"], []).append(_row(r))
    inits = {r["worker"]: _row(r) for r in await dashboard.last_admin_runs(pool, names, "init")}
    out = []
    for w in ws:
        j = _worker_json(w)
        # occupancy over the windows the worker row has (occupancy_15s, ...), where it has them
        j.update({k: v for k, v in w.items() if k.startswith("occupancy") and k not in j})
        j.update(dead=w["last_ping_s_ago"] > DEAD_AFTER_S, running=running.get(w["name"], []),
                 last_init=inits.get(w["name"]))
        out.append(j)
    return {"workers": out, "dead_after_s": DEAD_AFTER_S}


@router.get("/groups")
async def groups(_u: Admin, pool: Pool) -> dict[str, list[str]]:
    """The worker groups known: with a worker row or a stored config."""
    return {"groups": await dashboard.group_names(pool)}


@router.get("/groups/{group}", responses={404: error("not a worker group's name")})
async def group_config(group: str, _u: Admin, pool: Pool) -> dict[str, Any]:
    """A group's stored config, ``null`` when it has none (the page then edits a new one;
    ``GET /api/configs/worker__<group>`` answers 404 for that)."""
    group_of(f"worker__{group}")
    return {"group": group, "config": await workers.get_config(pool, f"worker__{group}")}


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
State = Literal["all", "active", "queued", "running", "completed", "success", "failure", "canceled"]


def _cursor(c: str | None) -> tuple[dt.datetime, uuid.UUID] | None:
    if c is None:
        return None
    if c == "first":
        return dashboard.FIRST
    at, _, jid = c.partition("_")
    try:
        return _EPOCH + dt.timedelta(microseconds=int(at)), uuid.UUID(jid)
    except (ValueError, OverflowError):
        raise HTTPException(400, f"bad cursor {c!r}: give back the 'next' of a previous page") from None


def cursor_of(row: dict[str, Any]) -> str:
    """The keyset cursor after ``row``: its completed_at in microseconds since 1970 (exact,
    and nothing a URL needs to escape) and its id."""
    return f"{(row['completed_at'] - _EPOCH) // dt.timedelta(microseconds=1)}_{row['id']}"


def _opt(v: str | None) -> str | None:
    return v or None  # an empty filter field means any


@router.get("/jobs", responses={400: {"description": "a bad cursor"}})
async def jobs(_u: Admin, pool: Pool, state: State = "all",
               workspace: str | None = Query(None, max_length=200),
               script: str | None = Query(None, max_length=255, description="script path, exactly"),
               tag: str | None = Query(None, max_length=200),
               cursor: str | None = Query(None, max_length=200, description="'next' of the page before"),
               limit: int = Query(50, ge=1, le=500)) -> dict[str, Any]:
    """Jobs of every workspace, filtered, newest first: the queue's (waiting and running)
    on the first page, then completed jobs paged by completion (keyset: ``next``)."""
    after = _cursor(cursor)
    workspace, script, tag = _opt(workspace), _opt(script), _opt(tag)
    out: list[dict[str, Any]] = []
    if after is None and state in ("all", "active", "queued", "running"):
        out = await dashboard.active_jobs(pool, workspace=workspace, script_path=script, tag=tag,
                                          state=state if state in ("queued", "running") else None,
                                          limit=limit)
    nxt = None
    if state in ("all", "completed", "success", "failure", "canceled"):
        done = await dashboard.completed_jobs(
            pool, after=after or dashboard.FIRST, workspace=workspace, script_path=script, tag=tag,
            status=state if state in dashboard.COMPLETED_STATES else None, limit=limit)
        if len(done) == limit:
            nxt = cursor_of(done[-1])
        out += done
    return {"jobs": [_row(r) for r in out], "next": nxt}
