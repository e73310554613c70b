"""The group's own scripts: the init script (before the worker takes jobs) and the periodic
one, run through its backend and recorded as completed jobs of the admins workspace."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid

from sandmill.isolation import Outcome

from .execute import storable_result
from .runtimes import JobResult, build_spec, interpret
from .settings import Group
from sandmill.store.storable import decode_output, storable_json

log = logging.getLogger("sandmill.worker")

ADMIN_WORKSPACE = "admins"  # where the workers' own jobs (init, periodic scripts) are recorded


async def run_admin_script(group: Group, kind: str, script: str) -> tuple[str, str, uuid.UUID]:
    """Run the group's init or periodic bash script through its backend, with the group's
    limits and env, and record it as a completed job (workspace admins, tag
    '<kind>-<worker>'). Returns (status, logs, job id)."""
    job = {"id": None, "language": "bash", "content": script, "args": {}, "timeout_s": None}
    chunks: list[str] = []
    started = dt.datetime.now(dt.timezone.utc)
    outcome: Outcome | None = None
    if group.backend is None:
        result = JobResult("failure", None, "no sandbox backend to run the script with")
    else:
        spec = build_spec(job, group.profile, group.env)
        # the script's output is as hostile as a job's: stored the same way
        outcome = await group.backend.run(spec, lambda _s, b: chunks.append(decode_output(b)))
        result = storable_result(interpret(job, outcome, group.profile.limits))
    logs = "".join(chunks)
    if result.status != "success":
        logs += f"\n[sandmill] {kind} script failed: {result.error}\n"
    job_id = await group.q.insert_completed(
        group.pool, workspace=ADMIN_WORKSPACE, kind=kind, language="bash", content=script,
        tag=f"{kind}-{group.name}", worker=group.name, started_at=started, status=result.status,
        result=result.result, error=result.error, logs=logs,
        duration_ms=outcome.wall_ms if outcome else 0, cpu_ms=outcome.cpu_ms if outcome else 0,
        mem_peak_kb=outcome.peak_memory_kb if outcome else 0,
        outcome=storable_json(outcome.to_json()) if outcome else None,
    )
    return result.status, logs, job_id


async def periodic_loop(group: Group, stopping: asyncio.Event) -> None:
    """Run the group's periodic script every periodic_interval_s (both as the group's config
    says at the time), until the worker stops."""
    while True:
        await asyncio.sleep(group.profile.periodic_interval_s)
        script = group.profile.periodic_script
        if not script or stopping.is_set():
            continue
        try:
            status, _logs, job_id = await run_admin_script(group, "periodic", script)
            if status != "success":
                log.warning("periodic script failed (job %s)", job_id)
        except Exception as e:  # noqa: BLE001 - the worker goes on; the next run may work
            log.warning("periodic script not run: %s", e)
