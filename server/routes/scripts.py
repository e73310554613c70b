"""Script endpoints: store a version, get one by path or hash, list them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from sandmill.store import scripts

from ..deps import ListScripts, Pool, ReadScripts, WriteScripts
from ..models import ScriptCreate, check_code
from ..pydeps import after_create, check_requirements
from ..submit import script_or_404
from ..views import _script_json
from .errors import IN_WORKSPACE

# Every route: 404 for another workspace's token, 403 for a scope it lacks (deps).
router = APIRouter(prefix="/api/w/{ws}/scripts", tags=["scripts"], responses=IN_WORKSPACE)


@router.post("/create", response_class=PlainTextResponse, status_code=201)
async def create_script(ws: str, body: ScriptCreate, _u: WriteScripts, pool: Pool) -> str:
    check_code(body.language, body.content)
    check_requirements(body.language, body.content)
    fields = body.model_dump()
    fields["timeout_s"] = fields.pop("timeout")
    h = await scripts.create(pool, ws, body.path, fields)
    await after_create(pool, ws, h, fields, body.path, _u.name)  # its dependency job
    return h


@router.get("/get/p/{path:path}")
async def get_script(ws: str, path: str, db: ReadScripts) -> dict[str, Any]:
    return _script_json(await script_or_404(db, ws, path=path))


@router.get("/get/h/{h}")
async def get_script_by_hash(ws: str, h: str, db: ReadScripts) -> dict[str, Any]:
    return _script_json(await script_or_404(db, ws, h=h))


@router.get("/list")
async def list_scripts(ws: str, _u: ListScripts, pool: Pool) -> list[dict[str, Any]]:
    return await scripts.list_scripts(pool, ws)
