"""Script endpoints: store a version, get one by path or hash, list them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from sandmill.store import scripts

from ..deps import Pool, User
from ..models import ScriptCreate, check_code
from ..submit import script_or_404
from ..views import _script_json

router = APIRouter(prefix="/api/w/{ws}/scripts", tags=["scripts"])


@router.post("/create", response_class=PlainTextResponse, status_code=201)
async def create_script(ws: str, body: ScriptCreate, _u: User, pool: Pool) -> str:
    check_code(body.language, body.content)
    fields = body.model_dump()
    fields["timeout_s"] = fields.pop("timeout")
    return await scripts.create(pool, ws, body.path, fields)


@router.get("/get/p/{path:path}")
async def get_script(ws: str, path: str, _u: User, pool: Pool) -> dict[str, Any]:
    return _script_json(await script_or_404(pool, ws, path=path))


@router.get("/get/h/{h}")
async def get_script_by_hash(ws: str, h: str, _u: User, pool: Pool) -> dict[str, Any]:
    return _script_json(await script_or_404(pool, ws, h=h))


@router.get("/list")
async def list_scripts(ws: str, _u: User, pool: Pool) -> list[dict[str, Any]]:
    return await scripts.list_scripts(pool, ws)
