"""SQL for python dependencies: a script version's lock, resolved once by a dependency job.

A python3 script version with requirements (``store/requirements.py``) gets
``lock_status`` 'pending' at ``scripts/create`` and a dependency job (kind
'dependency') on its tag; the worker that runs it resolves the lock and records it
('ready', or 'failed' with the resolver's message). A worker that claims one of the
script's jobs first resolves it itself (the same on-disk cache) and records it the same
way: the first record wins. The statements are in sql/pydeps.sql.
"""

from __future__ import annotations

import uuid
from typing import Any

from . import jobs
from .queries import Executor, sql

_MARK_PENDING = sql("pydeps_mark_pending")
_SET_LOCK_JOB = sql("pydeps_set_lock_job")
_SCRIPT_LOCK = sql("pydeps_script_lock")
_STORE_LOCK = sql("pydeps_store_lock")

DEPENDENCY_KIND = "dependency"


async def request_lock(conn: Executor, workspace: str, h: str, requirements: str, tag: str,
                       script: dict[str, Any], created_by: str = "admin") -> uuid.UUID | None:
    """Queue the dependency job that resolves the lock of script version ``h``; None when
    it is resolved or being resolved already. Run it in a transaction (the mark, the push
    and the job's id on the script go together)."""
    if await conn.fetchval(_MARK_PENDING, workspace, h, requirements) is None:
        return None
    job_id = await jobs.push(
        conn, workspace=workspace, language="python3", content=script["content"], args={},
        tag=tag, kind=DEPENDENCY_KIND, script_path=script["path"], script_hash=h,
        created_by=created_by)
    await conn.execute(_SET_LOCK_JOB, workspace, h, job_id)
    return job_id


async def script_lock(db: Executor, workspace: str, h: str) -> dict[str, Any] | None:
    """``requirements``, ``lock``, ``lock_status``, ``lock_error``, ``lock_job`` of a
    script version; None if there is no such version."""
    row = await db.fetchrow(_SCRIPT_LOCK, workspace, h)
    return dict(row) if row else None


async def store_lock(db: Executor, workspace: str, h: str, lock: str | None,
                     error: str | None) -> bool:
    """Record the resolved lock (or the failure, when ``lock`` is None) while the version is
    pending; False when another resolution was recorded first."""
    status = "ready" if lock is not None else "failed"
    return await db.fetchval(_STORE_LOCK, workspace, h, lock, status, error) is not None
