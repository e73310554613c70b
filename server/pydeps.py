"""The API's side of python dependencies: a python3 script's requirements checked at
``scripts/create`` and on previews (a bad ``# requirements:`` block is a 400), and the
dependency job queued for a new script version (store/pydeps.py says how its jobs wait)."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import HTTPException

from sandmill.store import pydeps
from sandmill.store.requirements import RequirementsError, requirements_of, requirements_text

from .routing import RoutingError, resolve_tag


def check_requirements(language: str, content: str) -> str | None:
    """A python3 script's requirements (one a line), None when it needs none; 400 naming
    the line of a bad ``# requirements:`` block."""
    if language != "python3":
        return None
    try:
        return requirements_text(requirements_of(content))
    except RequirementsError as e:
        raise HTTPException(400, f"content: {e}") from None


async def after_create(pool: Any, ws: str, h: str, fields: dict[str, Any], path: str,
                       created_by: str) -> uuid.UUID | None:
    """Queue the dependency job of a new python3 script version with requirements, on the
    tag its jobs go to (its own tag, else the language's); None when none is needed."""
    reqs = check_requirements(fields["language"], fields["content"])
    if reqs is None:
        return None
    try:
        tag = resolve_tag("python3", ws, {}, script_tag=fields.get("tag"))
    except RoutingError:  # a tag made from $args: the language's default workers resolve it
        tag = resolve_tag("python3", ws, {})
    async with pool.acquire() as conn, conn.transaction():
        return await pydeps.request_lock(conn, ws, h, reqs, tag,
                                         {"content": fields["content"], "path": path}, created_by)
