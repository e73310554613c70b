"""Worker endpoints: the live workers, and the worker group configs (partial profiles).
The admin's only: a workspace token gets 403."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, HTTPException
from fastapi.responses import JSONResponse

from sandmill.store import scripts, workers

from ..deps import Admin, Pool
from ..models import GROUP_RE, validate_group_config
from ..views import _worker_json
from .errors import AUTHED, error

router = APIRouter(tags=["workers"], responses=AUTHED)


@router.get("/api/workers/list")
async def list_workers(_u: Admin, pool: Pool) -> list[dict[str, Any]]:
    return [_worker_json(w) for w in await workers.list_workers(pool)]


def group_of(name: str) -> str:
    group = name.removeprefix("worker__")
    if group == name or not GROUP_RE.match(group):
        raise HTTPException(404, f"no config {name!r}: worker group configs are named"
                                 " worker__<group> (lowercase letters, digits, _ and -)")
    return group


@router.get("/api/configs/{name}", responses={404: error("no such config")})
@router.get("/api/configs/get/{name}", include_in_schema=False)
async def get_config(name: str, _u: Admin, pool: Pool) -> Any:
    """A worker group's config: a partial profile that overrides its YAML profile."""
    group = group_of(name)
    cfg = await workers.get_config(pool, name)
    if cfg is None:
        raise HTTPException(404, f"no config for worker group {group!r}")
    return cfg


@router.put("/api/configs/{name}", responses={404: error("not a worker group's config name")})
@router.post("/api/configs/update/{name}", include_in_schema=False)
async def put_config(name: str, _u: Admin, pool: Pool, body: Any = Body(...)) -> Any:
    """Set a worker group's config (a partial profile, e.g. ``{"tags": [...]}``). Running
    workers of the group reload it at once (NOTIFY), without restart."""
    group = group_of(name)
    cfg, errs = validate_group_config(group, body)
    if errs:
        msg = "; ".join(f"{e['field']}: {e['reason']}" for e in errs)
        return JSONResponse({"error": f"invalid worker group config: {msg}", "detail": errs},
                            status_code=422)
    if problem := await dedicated_problem(pool, cfg):
        return JSONResponse({"error": f"invalid worker group config: {problem}"}, status_code=422)
    await workers.put_config(pool, name, cfg)
    return cfg


async def dedicated_problem(pool: Any, cfg: dict[str, Any]) -> str | None:
    """A script a dedicated group would serve that is not python3 (the ones that exist)."""
    refs = ([cfg["dedicated_worker"]] if cfg.get("dedicated_worker") else []) + list(cfg.get("dedicated_workers") or [])
    for ref in refs:
        ws, _, path = ref.partition(":")
        s = await scripts.get_by_path(pool, ws, path)
        if s and s["language"] != "python3":
            return (f"dedicated_worker: script {path} of {ws} is {s['language']}: only python3 scripts"
                    " have a cold start for a dedicated worker to remove")
    return None
