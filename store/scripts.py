"""SQL for scripts: create a version, get by path or hash, list."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .queue import Executor

_COLUMNS = ("language", "content", "summary", "tag", "priority", "timeout_s", "concurrent_limit",
            "concurrency_time_window_s", "concurrency_key", "dedicated_worker")


def script_hash(path: str, fields: dict[str, Any]) -> str:
    """A script version's id: the hash of its path and every field that changes behaviour."""
    doc = json.dumps({"path": path, **{k: fields.get(k) for k in _COLUMNS}}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


async def create(db: Executor, workspace: str, path: str, fields: dict[str, Any]) -> str:
    """Store a version of the script at ``path`` (a no-op if the same version exists)."""
    h = script_hash(path, fields)
    cols = ", ".join(_COLUMNS)
    params = ", ".join(f"${i}" for i in range(4, 4 + len(_COLUMNS)))
    await db.execute(
        f"INSERT INTO script (workspace, path, hash, {cols}) VALUES ($1, $2, $3, {params})"
        " ON CONFLICT (workspace, hash) DO UPDATE SET created_at = now()",
        workspace, path, h, *[fields.get(k) for k in _COLUMNS],
    )
    return h


async def get_by_path(db: Executor, workspace: str, path: str) -> dict[str, Any] | None:
    row = await db.fetchrow(
        "SELECT * FROM script WHERE workspace = $1 AND path = $2 ORDER BY created_at DESC LIMIT 1",
        workspace, path,
    )
    return dict(row) if row else None


async def get_by_hash(db: Executor, workspace: str, h: str) -> dict[str, Any] | None:
    row = await db.fetchrow("SELECT * FROM script WHERE workspace = $1 AND hash = $2", workspace, h)
    return dict(row) if row else None


async def list_scripts(db: Executor, workspace: str) -> list[dict[str, Any]]:
    rows = await db.fetch(
        "SELECT DISTINCT ON (path) path, hash, language, summary, tag, created_at FROM script"
        " WHERE workspace = $1 ORDER BY path, created_at DESC",
        workspace,
    )
    return [dict(r) for r in rows]
