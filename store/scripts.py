"""SQL for scripts: create a version, get by path or hash, list.

The statements are in sql/scripts.sql."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from .queries import Executor, sql

# A script version's fields, in the order of create_script's columns after (workspace,
# path, hash): its $4 on.
_COLUMNS = ("language", "content", "summary", "tag", "priority", "timeout_s", "concurrent_limit",
            "concurrency_time_window_s", "concurrency_key", "dedicated_worker")

_CREATE = sql("create_script")
_BY_PATH = sql("script_by_path")
_BY_HASH = sql("script_by_hash")
_LIST = sql("list_scripts")

_cols = re.match(r"INSERT INTO script \(([^)]*)\)", _CREATE)
assert _cols and [c.strip() for c in _cols.group(1).split(",")] == ["workspace", "path", "hash", *_COLUMNS], \
    "sql/scripts.sql create_script: its columns must be (workspace, path, hash, *_COLUMNS)"


def script_hash(path: str, fields: dict[str, Any]) -> str:
    """A script version's id: the hash of its path and every field that changes behaviour."""
    # dedicated_worker only when set: versions without it keep the hashes they had
    doc = json.dumps({"path": path, **{k: fields.get(k) for k in _COLUMNS if k != "dedicated_worker"},
                      **({"dedicated_worker": True} if fields.get("dedicated_worker") else {})},
                     sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()[:16]


async def create(db: Executor, workspace: str, path: str, fields: dict[str, Any]) -> str:
    """Store a version of the script at ``path`` (a no-op if the same version exists)."""
    h = script_hash(path, fields)
    await db.execute(_CREATE, workspace, path, h, *[fields.get(k) for k in _COLUMNS[:-1]],
                     bool(fields.get("dedicated_worker")))
    return h


async def get_by_path(db: Executor, workspace: str, path: str) -> dict[str, Any] | None:
    row = await db.fetchrow(_BY_PATH, workspace, path)
    return dict(row) if row else None


async def get_by_hash(db: Executor, workspace: str, h: str) -> dict[str, Any] | None:
    row = await db.fetchrow(_BY_HASH, workspace, h)
    return dict(row) if row else None


async def list_scripts(db: Executor, workspace: str) -> list[dict[str, Any]]:
    rows = await db.fetch(_LIST, workspace)
    return [dict(r) for r in rows]
