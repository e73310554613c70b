"""An agent worker's store: the functions of ``sandmill.store.queue`` and
``sandmill.store.workers`` that a worker calls, with the same names and signatures, done
over HTTP through the server's agent routes (``server/routes/agent.py``). Their ``db``
argument (the pool or a connection, for a DB worker) is the ``AgentClient``; the group and
tags are the token's, whatever the worker passes.

Completions go through a durable outbox (``Outbox``): written to the worker's data dir
before they are sent, removed once the server has answered for them (completed, already
completed by this worker, or refused), so a result outlives a server outage, and an agent
restarted on the same data dir sends what its last process could not."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from asyncpg.pgproto.pgproto import UUID as PgUUID

from sandmill.store.claims import Completion

from sandmill.store.wirejson import dumps

from .agent_client import AgentClient, AgentRefused

log = logging.getLogger("sandmill.worker")


def _job(j: dict[str, Any]) -> dict[str, Any]:
    """A job as the server sends it, as the claim statements return it (the id a UUID:
    asyncpg's, as a DB worker's claims give it, read in C, 0.2 µs against uuid.UUID's 1.9)."""
    j["id"] = PgUUID(j["id"])
    return j


def _done(c: Completion) -> dict[str, Any]:
    return {"id": c.job_id, "status": c.status, "result": c.result, "error": c.error,
            "duration_ms": c.duration_ms, "cpu_ms": c.cpu_ms, "mem_peak_kb": c.mem_peak_kb,
            "outcome": c.outcome, "started_at": c.started_at}


class Outbox:
    """Completions not yet answered for, one file per batch under ``root/<worker>/``
    (written, not fsynced: it is the server's outage and this process's death it covers,
    not the host's)."""

    def __init__(self, root: Path, worker: str):
        self.root = root
        self.dir = root / worker.replace("/", "_")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.worker = worker

    def put(self, done: list[dict[str, Any]]) -> Path:
        path = self.dir / f"{uuid.uuid4().hex}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(dumps({"worker": self.worker, "pid": os.getpid(), "done": done}))
        tmp.rename(path)
        return path

    def leftovers(self) -> list[tuple[Path, dict[str, Any]]]:
        """The batches of this data dir's dead agent processes, never answered for."""
        out = []
        for d in self.root.iterdir() if self.root.is_dir() else ():
            if d == self.dir or not d.is_dir():
                continue
            for f in sorted(d.glob("*.json")):
                try:
                    batch = json.loads(f.read_text())
                except (OSError, ValueError):
                    f.unlink(missing_ok=True)
                    continue
                if _alive(batch.get("pid")):
                    break  # another agent on this data dir, running: its own to send
                out.append((f, batch))
        return out


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AgentStore:
    """``queue`` and ``workers``, for an agent worker named ``name``."""

    def __init__(self, client: AgentClient, name: str, outbox: Outbox | None):
        self.client = client
        self.name = name
        self.outbox = outbox
        self._short = False  # the last claim of n got fewer: pull() finds nothing either
        self._due: tuple[float, float | None] | None = None  # (when, due) of the last empty claim
        self._stats: dict[str, Any] | None = None  # the worker's last ping, sent with the long poll
        # the outbox file of a batch not yet answered for, by its job ids: the feed sends the
        # same batch again after an outage, and its retries reuse the file (not one per try)
        self._kept: dict[tuple[uuid.UUID, ...], Path] = {}

    # ---- claims and completions (store.claims) ----------------------------------------------

    async def pull(self, _db: Any, _worker: str, _tags: list[str]) -> dict[str, Any] | None:
        if self._short:  # the server's claim of n already took keyed jobs one by one
            self._short = False
            return None
        r = await self.client.post("pull_job", {"name": self.name, "n": 1}, idempotent=True)
        self._note_idle(r)
        return _job(r["jobs"][0]) if r["jobs"] else None

    async def pull_many(self, _db: Any, _worker: str, _tags: list[str], limit: int, *, ahead: int = 0,
                        ahead_after_s: float = 0.0) -> list[dict[str, Any]]:
        r = await self.client.post("pull_job", {"name": self.name, "n": limit, "ahead": ahead,
                                                "ahead_after_s": ahead_after_s}, idempotent=True)
        jobs = [_job(j) for j in r["jobs"]]
        self._short = not ahead and len(jobs) < limit
        self._note_idle(r)
        return jobs

    def _note_idle(self, r: dict[str, Any]) -> None:
        if "idle" in r:  # nothing to claim, and the server knows when the next comes due
            self._due = (time.monotonic(), r["idle"]["due"])

    async def complete_many(self, db: Any, done: list[Completion]) -> dict[uuid.UUID, str]:
        if not done:
            return {}
        statuses, _ = await self.complete_and_pull(db, done, self.name, [], 0)
        return statuses

    async def complete_and_pull(self, _db: Any, done: list[Completion], _worker: str, _tags: list[str],
                                want: int, *, ahead: int = 0, ahead_after_s: float = 0.0,
                                starting: list[tuple[uuid.UUID, dt.datetime]] | None = None,
                                ) -> tuple[dict[uuid.UUID, str], list[dict[str, Any]]]:
        body = [_done(c) for c in done]
        key = tuple(c.job_id for c in done)
        if self.outbox is not None and body and key not in self._kept:
            self._kept[key] = self.outbox.put(body)
        try:
            r = await self.client.post("complete", {
                "name": self.name, "done": body, "want": want, "ahead": ahead,
                "ahead_after_s": ahead_after_s, "starting": starting or []}, idempotent=True)
        except AgentRefused:  # refused (a value the database cannot hold): sent apart
            self._answered(key)
            raise
        self._answered(key)  # completed, acknowledged or refused
        if r["refused"]:
            log.warning("results refused by the server (jobs not this worker's any more): %s", r["refused"])
        # the ids back as the UUIDs sent (str() of one costs a third of parsing the text)
        sent = {str(c.job_id): c.job_id for c in done}
        statuses = {sent.get(k) or PgUUID(k): v for k, v in r["statuses"].items()}
        return statuses, [_job(j) for j in r["jobs"]]

    def _answered(self, key: tuple[uuid.UUID, ...]) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            kept.unlink(missing_ok=True)

    async def send_leftovers(self) -> int:
        """Send the results a dead agent process of this data dir left unanswered."""
        n = 0
        for path, batch in self.outbox.leftovers() if self.outbox is not None else ():
            for d in batch.get("done", []):
                try:
                    await self.client.post(f"send_result/{d['id']}", {**d, "name": batch["worker"]})
                    n += 1
                except AgentRefused as e:
                    log.warning("a result left by %s: %s", batch.get("worker"), e.message)
            path.unlink(missing_ok=True)
        return n

    # ---- the other writes and reads (store.jobs, store.reads) ---------------------------

    async def requeue(self, _db: Any, job_id: uuid.UUID, _worker: str) -> bool:
        return (await self.client.post("requeue", {"name": self.name, "job_id": job_id}))["requeued"]

    async def ping_job(self, _db: Any, job_id: uuid.UUID, _worker: str) -> str:
        r = await self.client.post("ping_job", {"name": self.name, "job_id": job_id}, retry_s=2.0)
        return r["state"]

    async def append_logs(self, _db: Any, job_id: uuid.UUID, chunks: list[str]) -> None:
        if chunks:
            await self.client.post("append_logs", {"name": self.name, "job_id": job_id, "chunks": chunks},
                                   retry_s=10.0)

    async def next_due(self, _db: Any, _tags: list[str]) -> dt.datetime | None:
        """When the next job of the tags comes due: told by the empty claim just before
        (the idle slots ask right after one), else asked."""
        if self._due is not None and time.monotonic() - self._due[0] < 1.0:
            due = self._due[1]
        else:
            due = (await self.client.post("next_due", {"name": self.name}, retry_s=2.0))["due"]
        self._due = None
        return dt.datetime.fromtimestamp(due, dt.timezone.utc) if due is not None else None

    async def insert_completed(self, _db: Any, *, kind: str, content: str, started_at: dt.datetime,
                               status: str, result: Any, error: str | None, logs: str,
                               duration_ms: int = 0, cpu_ms: int = 0, mem_peak_kb: int = 0,
                               outcome: dict[str, Any] | None = None, **_fixed: Any) -> uuid.UUID:
        """An init or periodic script's record (workspace, tag and worker: the server's)."""
        r = await self.client.post("insert_completed", {
            "name": self.name, "kind": kind, "content": content, "started_at": started_at,
            "status": status, "result": result, "error": error, "logs": logs,
            "duration_ms": duration_ms, "cpu_ms": cpu_ms, "mem_peak_kb": mem_peak_kb,
            "outcome": outcome}, idempotent=True)
        return uuid.UUID(r["id"])

    # ---- the worker table and the group's config (store.workers) -----------------------

    async def register(self, _db: Any, *, name: str, group: str, hostname: str, tags: list[str],
                       backend: str, subworkers: int, info: dict[str, Any]) -> None:
        await self.client.post("register", {"name": name, "group": group, "hostname": hostname,
                                            "tags": tags, "backend": backend, "subworkers": subworkers,
                                            "info": info})

    async def ping(self, _db: Any, name: str, *, tags: list[str], jobs_done: int, busy: int,
                   occupancy: float, **_more: Any) -> None:
        """Kept for the next long poll, which carries it (no request of its own)."""
        self._stats = {"jobs_done": jobs_done, "busy": busy, "occupancy": min(1.0, max(0.0, occupancy))}

    def take_stats(self) -> dict[str, Any] | None:
        stats, self._stats = self._stats, None
        return stats

    async def unregister(self, _db: Any, name: str) -> None:
        await self.client.post("unregister", {"name": name}, retry_s=5.0)

    async def get_config(self, _db: Any, _name: str) -> dict[str, Any] | None:
        return await self.client.post("get_config", {"name": self.name})
