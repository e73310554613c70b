"""The hot path of a worker: claim jobs, complete them, and both in one statement.

The statements are in sql/claims.sql; why they are shaped as they are, with the figures,
is in docs/performance.md ("Store"). Use through ``sandmill.store.queue``.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from dataclasses import dataclass
from typing import Any

from .queries import Executor, sql

_PULL = sql("pull")
_PULL_ONE_TAG = sql("pull_one_tag")
_PULL_MANY = sql("pull_many")
_PULL_MANY_ONE_TAG = sql("pull_many_one_tag")
_PULL_MANY_AHEAD = sql("pull_many_ahead")
_PULL_MANY_AHEAD_ONE_TAG = sql("pull_many_ahead_one_tag")
_COMPLETE = sql("complete")
_COMPLETE_AND_CLAIM = sql("complete_and_claim")
_COMPLETE_AND_CLAIM_ONE_TAG = sql("complete_and_claim_one_tag")

# Session settings of a connection that claims and completes jobs (a worker's pool): the
# in-order scan of queue_pull_idx whatever the statistics say, index lookups in a queue
# that is hot in memory, and no re-planning of the first five runs of each statement.
CLAIM_SETTINGS = {"enable_sort": "off", "random_page_cost": "1.1",
                  "plan_cache_mode": "force_generic_plan"}


def split_tags(tags: list[str]) -> tuple[list[str], list[str], list[str]]:
    """A worker's tags as the pull needs them: (every base tag, the unrestricted tags,
    'tag(ws)' pairs). ``gpu(ws1+ws2)`` serves tag gpu only for workspaces ws1 and ws2."""
    bases, plain, pairs = [], [], []
    for t in tags:
        if t.endswith(")") and "(" in t:
            base, _, wss = t[:-1].partition("(")
            pairs += [f"{base}({w})" for w in wss.split("+") if w]
        else:
            base = t
            plain.append(t)
        if base not in bases:
            bases.append(base)
    return bases, plain, pairs


async def pull(db: Executor, worker: str, tags: list[str]) -> dict[str, Any] | None:
    """Claim the next job for ``tags`` (one with a concurrency key included, taking a slot
    of its key), or None when nothing is due."""
    bases, plain, pairs = split_tags(tags)
    stmt = _PULL_ONE_TAG if len(bases) == 1 else _PULL
    for _ in range(20):
        row = await db.fetchrow(stmt, bases, worker, plain, pairs)
        if row is None:
            return None
        if row["id"] is not None:
            job = dict(row)
            del job["cand_id"]
            return job
        # A racing worker took the last slot of this job's key: look again at once.
    return None


async def pull_many(db: Executor, worker: str, tags: list[str], limit: int, *, ahead: int = 0,
                    ahead_after_s: float = 0.0) -> list[dict[str, Any]]:
    """Claim up to ``limit`` due jobs, best first, up to the first one with a concurrency
    key (which pull() takes; the caller falls back to it when it gets fewer than it asked
    for); and up to ``ahead`` more to hold ahead, of those due ``ahead_after_s`` ago
    (their ``started_at`` is None; see complete_and_pull)."""
    bases, plain, pairs = split_tags(tags)
    if ahead:
        stmt = _PULL_MANY_AHEAD_ONE_TAG if len(bases) == 1 else _PULL_MANY_AHEAD
        return _best_first(await db.fetch(stmt, bases, worker, plain, pairs, limit, ahead,
                                          float(ahead_after_s)))
    stmt = _PULL_MANY_ONE_TAG if len(bases) == 1 else _PULL_MANY
    return _best_first(await db.fetch(stmt, bases, worker, plain, pairs, limit))


def _best_first(rows, drop: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Claimed rows as jobs, best first (by the rank the claim gave them), without the
    rank and the ``drop`` columns."""
    jobs = []
    for r in sorted(rows, key=lambda r: r["rank"]):
        job = dict(r)
        for k in ("rank", *drop):
            del job[k]
        jobs.append(job)
    return jobs


@dataclass
class Completion:
    """How one job ended, as its worker reports it."""

    job_id: uuid.UUID
    worker: str
    status: str
    result: Any
    error: str | None
    duration_ms: int = 0
    cpu_ms: int = 0
    mem_peak_kb: int = 0
    outcome: dict[str, Any] | None = None
    # when it started, by the worker's clock: the start of a job held ahead whose start
    # stamp has not landed when it completes
    started_at: dt.datetime | None = None
    # the job's whole log text when it rides on the completion (a short job's: no log
    # statement of its own); only complete_and_pull stores it
    logs: str | None = None


async def complete_many(db: Executor, done: list[Completion]) -> dict[uuid.UUID, str]:
    """Move running jobs to completed_job in one statement. Returns each completed job's
    final status (a job canceled while running completes as ``canceled``); a job that is
    not its worker's any more (the monitor gave it away) is left alone and absent."""
    if not done:
        return {}
    rows = await db.fetch(_COMPLETE, *_completion_arrays(done))
    return {r["id"]: r["status"] for r in rows}


async def complete(
    db: Executor,
    job_id: uuid.UUID,
    worker: str,
    *,
    status: str,
    result: Any,
    error: str | None,
    duration_ms: int,
    cpu_ms: int,
    mem_peak_kb: int,
    outcome: dict[str, Any] | None,
) -> str | None:
    """Complete one running job (see complete_many). Returns its final status, or None
    when it is not this worker's any more."""
    done = await complete_many(db, [Completion(job_id, worker, status, result, error, duration_ms,
                                               cpu_ms, mem_peak_kb, outcome)])
    return done.get(job_id)


async def complete_and_pull(db: Executor, done: list[Completion], worker: str, tags: list[str],
                            want: int, *, ahead: int = 0, ahead_after_s: float = 0.0,
                            starting: list[tuple[uuid.UUID, dt.datetime]] | None = None,
                            ) -> tuple[dict[uuid.UUID, str], list[dict[str, Any]]]:
    """complete_many, and in the same statement claim up to ``want`` jobs for ``worker``
    as pull_many does (none with a concurrency key: the caller pulls those with pull()),
    plus up to ``ahead`` jobs to hold ahead among those that have waited ``ahead_after_s``
    since they were due (their ``started_at`` is None), and stamp the start of the held
    jobs in ``starting``, (id, when it started) pairs, none of them in ``done``. Returns
    (final status by completed job id, the claimed jobs best first: the first ``want`` to
    run now). A completion's ``logs`` are appended in the same statement (its $20: the
    log texts, or NULL when no completion has logs, which appends nothing and costs less)."""
    bases, plain, pairs = split_tags(tags)
    logs = [c.logs or "" for c in done] if any(c.logs for c in done) else None
    stmt = _COMPLETE_AND_CLAIM_ONE_TAG if len(bases) == 1 else _COMPLETE_AND_CLAIM
    rows = await db.fetch(stmt, bases, worker, plain, pairs, want, *_completion_arrays(done), ahead,
                          float(ahead_after_s), [j for j, _ in starting or []],
                          [at for _, at in starting or []], logs)
    # one row carries the completions (none has them when nothing was completed)
    first = next((r for r in rows if r["done_ids"] is not None), None)
    statuses = dict(zip(first["done_ids"], first["done_status"])) if first else {}
    return statuses, _best_first((r for r in rows if r["id"] is not None), drop=("done_ids", "done_status"))


async def prepare_worker_statements(db: Executor, worker: str, tags: list[str]) -> None:
    """Run a worker's claim and completion statements once with nothing to claim or
    complete: their first use on a connection (parse, asyncpg's look-up of their array
    types) is then at start, not on the first jobs' path."""
    await complete_and_pull(db, [], worker, tags, 0)
    await pull_many(db, worker, tags, 0)
    bases, plain, pairs = split_tags(tags)  # the claim of jobs to hold ahead, for none
    await db.fetch(_PULL_MANY_AHEAD_ONE_TAG if len(bases) == 1 else _PULL_MANY_AHEAD,
                   bases, worker, plain, pairs, 0, 0, 0.0)
    await db.fetch(_COMPLETE, *_completion_arrays([]))


def _completion_arrays(done: list[Completion]) -> list[list[Any]]:
    """The ten parameter arrays of the completion (complete's $1..$10), one element per job."""
    return [[c.job_id for c in done], [c.worker for c in done], [c.status for c in done],
            [_json(c.result) for c in done], [c.error for c in done], [c.duration_ms for c in done],
            [c.cpu_ms for c in done], [c.mem_peak_kb for c in done], [_json(c.outcome) for c in done],
            [c.started_at for c in done]]


def _json(v: Any) -> str | None:
    return None if v is None else json.dumps(v)
