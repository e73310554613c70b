"""The one home of job SQL: push, pull, complete, logs, heartbeats, cancel, reads.

Every function takes an asyncpg connection (or pool) as its first argument, so the API,
the monitor and the workers share one implementation.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
import uuid
from typing import Any

import asyncpg

# NOTIFY channels. Payloads stay tiny; listeners re-read the tables.
CH_QUEUE = "sandmill_queue"    # payload: the tag of a new job ("tag" or "tag|epoch" if scheduled)
CH_DONE = "sandmill_done"      # payload: the id of a completed job pushed with notify_done
CH_CANCEL = "sandmill_cancel"  # payload: the id of a running job to kill

Executor = asyncpg.Connection | asyncpg.Pool

_PUSH = f"""
INSERT INTO queue (id, workspace, kind, script_path, script_hash, language, content, args,
                   tag, priority, timeout_s, created_by, scheduled_for,
                   concurrency_key, concurrent_limit, concurrency_time_window_s, notify_done)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
        now() + make_interval(secs => $13), $14, $15, $16, $17)
RETURNING id, scheduled_for,
          pg_notify('{CH_QUEUE}', $9 || CASE WHEN $13 > 0
                     THEN '|' || extract(epoch FROM now() + make_interval(secs => $13))::text
                     ELSE '' END)
"""


async def push(
    db: Executor,
    *,
    workspace: str,
    language: str,
    content: str,
    args: dict[str, Any],
    tag: str,
    kind: str = "script",
    script_path: str | None = None,
    script_hash: str | None = None,
    priority: int = 0,
    timeout_s: float | None = None,
    scheduled_in_secs: float = 0,
    created_by: str = "admin",
    concurrency_key: str | None = None,
    concurrent_limit: int | None = None,
    concurrency_time_window_s: int | None = None,
    notify_done: bool = False,
) -> uuid.UUID:
    """Queue one job and wake the workers that serve its tag. Returns the job id.
    ``notify_done``: someone waits for the result, NOTIFY CH_DONE when it completes (a
    NOTIFY wakes every listening backend of the database, so only when asked)."""
    job_id = uuid.uuid4()
    await db.fetchrow(
        _PUSH, job_id, workspace, kind, script_path, script_hash, language, content, args,
        tag, priority, timeout_s, created_by, float(scheduled_in_secs),
        concurrency_key, concurrent_limit, concurrency_time_window_s, notify_done,
    )
    return job_id


# The waiting jobs a claim may take, best first: of the worker's tags ($1 base tags, $3
# plain tags, $4 'tag(ws)' pairs), due, and with room in their concurrency key. Shared by
# _PULL and _claim_ctes.
_DUE_FOR_US = """
      FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key
     WHERE NOT q.running AND q.tag = ANY($1::text[]) AND q.scheduled_for <= now()
       AND (q.tag = ANY($3::text[]) OR q.tag || '(' || q.workspace || ')' = ANY($4::text[]))
       AND (q.concurrency_key IS NULL OR ck.key IS NULL
            OR sandmill_has_slot(ck.running, ck.starts, q.concurrent_limit,
                                 coalesce(q.concurrency_time_window_s, 0)))
     ORDER BY q.priority DESC, q.scheduled_for, q.seq
"""


def _one_tag(sql: str) -> str:
    """The same claim for a worker with one base tag: ``tag = ANY(array)`` keeps
    PostgreSQL (16) from reading queue_pull_idx in its (tag, priority DESC, scheduled_for,
    seq) order, so it reads and sorts every waiting row of the tag (about 2 ms per pull
    with 2,000 waiting); with plain equality it reads the index in order and stops at the
    first free row (0.4 ms)."""
    one = sql.replace("q.tag = ANY($1::text[]) AND q.scheduled_for",
                      "q.tag = ($1::text[])[1] AND q.scheduled_for")
    assert one != sql
    return one


# What a claim hands the worker: what it runs and reports, not the whole row (a worker
# decodes every column of every job it claims: the whole row costs it about twice as
# much per job, on the hot path of a busy worker).
_JOB_COLUMNS = """q.id, q.seq, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
              q.content, q.args, q.tag, q.priority, q.timeout_s, q.scheduled_for, q.started_at,
              q.running, q.worker, q.restarts, q.concurrency_key, q.notify_done"""


# One statement: pick the best waiting job of our tags that is due and whose concurrency
# key has room, skip rows another worker holds, take a slot of its key, and mark it ours.
# The slot is taken by INSERT .. ON CONFLICT DO UPDATE .. WHERE, which PostgreSQL re-checks
# on the key row's newest version when pullers race: the limit holds under any race. A
# candidate that lost its slot that way comes back with claimed id NULL, and pull() tries
# again.
_PULL = """
WITH cand AS (
    SELECT q.id, q.concurrency_key AS key, q.concurrent_limit AS lim,
           coalesce(q.concurrency_time_window_s, 0) AS win""" + _DUE_FOR_US + """     LIMIT 1
     FOR UPDATE OF q SKIP LOCKED
), slot AS (
    INSERT INTO concurrency_key AS ck (key, running, starts)
    SELECT key, ARRAY[id],
           CASE WHEN win > 0 THEN ARRAY[extract(epoch FROM clock_timestamp())::double precision]
                ELSE '{}'::double precision[] END
      FROM cand WHERE key IS NOT NULL
    ON CONFLICT (key) DO UPDATE
       SET running = ck.running || excluded.running,
           -- the clock is read again here: excluded's was read before we got the row lock
           starts = sandmill_live_starts(ck.starts, (SELECT win FROM cand))
                    || CASE WHEN (SELECT win FROM cand) > 0
                            THEN ARRAY[extract(epoch FROM clock_timestamp())::double precision]
                            ELSE '{}'::double precision[] END
     WHERE sandmill_has_slot(ck.running, ck.starts, (SELECT lim FROM cand), (SELECT win FROM cand))
    RETURNING key, ck.starts[cardinality(ck.starts)] AS started
), claimed AS (
    -- started_at is the very start the window counted, so what the limit enforces is what
    -- the job records show
    UPDATE queue q
       SET running = true, worker = $2, last_ping = now(),
           started_at = coalesce((SELECT to_timestamp(started) FROM slot), clock_timestamp())
      FROM cand c
     WHERE q.id = c.id AND (c.key IS NULL OR EXISTS (SELECT 1 FROM slot))
    RETURNING """ + _JOB_COLUMNS + """
)
SELECT c.id AS cand_id, cl.* FROM cand c LEFT JOIN claimed cl ON true
"""


_PULL_ONE_TAG = _one_tag(_PULL)


async def pull(db: Executor, worker: str, tags: list[str]) -> dict[str, Any] | None:
    """Claim the next job for ``tags``, or None when nothing is due."""
    bases, plain, pairs = split_tags(tags)
    sql = _PULL_ONE_TAG if len(bases) == 1 else _PULL
    for _ in range(20):
        row = await db.fetchrow(sql, bases, worker, plain, pairs)
        if row is None:
            return None
        if row["id"] is not None:
            job = dict(row)
            del job["cand_id"]
            return job
        # A racing worker took the last slot of this job's key: look again at once.
    return None


# The claim of several jobs in one statement (CTEs cand, pick, claimed), for the slots of
# a worker that want a job at the same moment: $1 base tags, $2 worker, $3 plain tags,
# $4 'tag(ws)' pairs, $5 how many. It takes the best due jobs up to the first one with a
# concurrency key, and stops there: a key's slot is taken one job at a time by _PULL (the
# caller falls back to pull() when it gets fewer jobs than it asked for), and the jobs
# behind a keyed job must not pass it (a busy worker claims through this alone). Each
# claimed row carries its rank (1 = best), for the caller to order them by.
#
# With ``ahead`` = p, the claim also takes up to $p more jobs to hold ahead (a busy slot's
# next job, claimed while its current one runs, so that the round trip of its completion
# is off the slot's path), but only jobs that have waited $(p+1) seconds since they were
# due: a backlog that no idle slot took, not a fresh job an idle worker is about to claim.
# A job held ahead is running and ours but has not started (started_at NULL) until the
# worker says so (_complete_ctes' start stamps).
def _claim_ctes(ahead: int | None = None) -> str:
    if ahead is None:
        limit, keep, started = "$5", "", "clock_timestamp()"
    else:
        limit = f"$5::int + ${ahead}::int"
        keep = f"\n       AND (rank <= $5 OR scheduled_for <= now() - make_interval(secs => ${ahead + 1}::float8))"
        started = "CASE WHEN pick.rank <= $5 THEN clock_timestamp() END"
    return """
cand AS (
    SELECT q.id, q.concurrency_key IS NOT NULL AS keyed, q.priority, q.scheduled_for, q.seq""" + _DUE_FOR_US + f"""     LIMIT {limit}
     FOR UPDATE OF q SKIP LOCKED
), pick AS (
    SELECT id, rank FROM (
        SELECT id, scheduled_for, bool_or(keyed) OVER w AS from_key, row_number() OVER w AS rank
          FROM cand WINDOW w AS (ORDER BY priority DESC, scheduled_for, seq)) c
     WHERE NOT from_key{keep}
), claimed AS (
    UPDATE queue q
       SET running = true, worker = $2, started_at = {started}, last_ping = now()
      FROM pick WHERE q.id = pick.id
    RETURNING """ + _JOB_COLUMNS + """, pick.rank
)"""


# Session settings for a connection that claims and completes jobs (a worker's pool).
# The claims read queue_pull_idx in order and stop after the first free rows; but with
# statistics taken while the queue was short (or none yet), PostgreSQL estimates a burst
# of thousands of waiting rows as a handful and plans a bitmap scan and a sort of every
# waiting row instead, per claim: 0.7 ms of database time a job with 8,000 waiting, 1.4 ms
# with 20,000 (against 0.14 ms). With sorts priced out, the in-order scan is the plan
# whatever the statistics say (a query that must sort still sorts). And the queue is hot
# in memory: at the default random_page_cost (4, for spinning disks) a completion scans
# the whole queue (0.5 ms with 2,000 waiting) rather than look its rows up by key.
# Generic plans: PostgreSQL plans the first five runs of a prepared statement on each
# connection anew (custom plans) before it settles on the generic one. The completion and
# claim statement takes 1.5-2 ms to plan (6 ms on a busy machine), and the connections
# that run it rarely (the second completion in flight, the burst claims: the ends and
# starts of bursts, where time counts most) paid that on every run. Their plans do not
# depend on the values: the generic plan is the one PostgreSQL settles on anyway.
CLAIM_SETTINGS = {"enable_sort": "off", "random_page_cost": "1.1",
                  "plan_cache_mode": "force_generic_plan"}


_PULL_MANY = "WITH " + _claim_ctes() + "\nSELECT * FROM claimed"
_PULL_MANY_ONE_TAG = _one_tag(_PULL_MANY)
_PULL_MANY_AHEAD = "WITH " + _claim_ctes(ahead=6) + "\nSELECT * FROM claimed"
_PULL_MANY_AHEAD_ONE_TAG = _one_tag(_PULL_MANY_AHEAD)


async def pull_many(db: Executor, worker: str, tags: list[str], limit: int, *, ahead: int = 0,
                    ahead_after_s: float = 0.0) -> list[dict[str, Any]]:
    """Claim up to ``limit`` due jobs, best first, up to the first one with a concurrency
    key (which pull() takes); and up to ``ahead`` more to hold ahead, of those due
    ``ahead_after_s`` ago (their ``started_at`` is None; see complete_and_pull)."""
    bases, plain, pairs = split_tags(tags)
    if ahead:
        sql = _PULL_MANY_AHEAD_ONE_TAG if len(bases) == 1 else _PULL_MANY_AHEAD
        return _best_first(await db.fetch(sql, bases, worker, plain, pairs, limit, ahead, float(ahead_after_s)))
    sql = _PULL_MANY_ONE_TAG if len(bases) == 1 else _PULL_MANY
    return _best_first(await db.fetch(sql, bases, worker, plain, pairs, limit))


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


async def next_due(db: Executor, tags: list[str]) -> dt.datetime | None:
    """When the earliest waiting job of ``tags`` may start: its scheduled time, or later
    when its concurrency key is full (None if none can start before a job ends)."""
    bases, plain, pairs = split_tags(tags)
    return await db.fetchval(
        "SELECT min(CASE WHEN q.concurrency_key IS NULL OR ck.key IS NULL THEN q.scheduled_for"
        "  ELSE greatest(q.scheduled_for, sandmill_slot_free_at(ck.running, ck.starts,"
        "       q.concurrent_limit, coalesce(q.concurrency_time_window_s, 0))) END)"
        "  FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key"
        " WHERE NOT q.running AND q.tag = ANY($1::text[])"
        "   AND (q.tag = ANY($2::text[]) OR q.tag || '(' || q.workspace || ')' = ANY($3::text[]))",
        bases, plain, pairs,
    )


# Put a running job back in the queue ($3: count it as a restart, unless it never started:
# a job held ahead), give its concurrency slot back, and wake the workers of its tag.
_REQUEUE = f"""
WITH q AS (
    UPDATE queue SET running = false, worker = NULL, started_at = NULL, last_ping = NULL,
                     restarts = restarts + CASE WHEN started_at IS NULL THEN 0 ELSE $3::int END
     WHERE id = $1 AND worker = $2 AND running
    RETURNING id, tag, concurrency_key
), released AS (
    UPDATE concurrency_key ck SET running = array_remove(ck.running, q.id)
      FROM q WHERE ck.key = q.concurrency_key
)
SELECT pg_notify('{CH_QUEUE}', tag) FROM q
"""


def _complete_ctes(p: int) -> str:
    """Completion of a batch of jobs (CTEs i, gone, released, done), its ten arrays from
    parameter $p on: each queue row goes, its concurrency slot is given back, its completed
    row is written, and result waiters (notify_done) are notified. Only the worker that
    holds a job can complete it."""
    a = [f"${p + k}" for k in range(10)]
    return f"""
i AS (
    -- results travel as JSON text: a list would read as an array dimension in jsonb[]
    SELECT id, worker, status, result::jsonb AS result, error, duration_ms, cpu_ms, mem_peak,
           outcome::jsonb AS outcome, started
      FROM unnest({a[0]}::uuid[], {a[1]}::text[], {a[2]}::text[], {a[3]}::text[], {a[4]}::text[],
                  {a[5]}::int[], {a[6]}::int[], {a[7]}::int[], {a[8]}::text[], {a[9]}::timestamptz[])
        AS t(id, worker, status, result, error, duration_ms, cpu_ms, mem_peak, outcome, started)
), gone AS (
    -- id = ANY: looked up by primary key (joined to i alone, with no statistics of the
    -- batch, PostgreSQL may hash-join a scan of the whole queue). No `running` test: a
    -- job has a worker exactly while it runs (claims set both, requeues clear both), and
    -- with it PostgreSQL may AND the key lookup with a scan of all of queue_running_idx,
    -- dead entries of every job run since the last vacuum included.
    DELETE FROM queue USING i
     WHERE queue.id = ANY({a[0]}::uuid[]) AND queue.id = i.id AND queue.worker = i.worker
    RETURNING queue.*,
              CASE WHEN queue.notify_done THEN pg_notify('{CH_DONE}', queue.id::text) END AS notified
), released AS (
    UPDATE concurrency_key ck
       SET running = (SELECT coalesce(array_agg(x), '{{}}') FROM unnest(ck.running) x
                       WHERE x <> ALL(r.ids))
      FROM (SELECT concurrency_key AS key, array_agg(id) AS ids, min(tag) AS tag
              FROM gone WHERE concurrency_key IS NOT NULL GROUP BY 1) r
     WHERE ck.key = r.key
    RETURNING pg_notify('{CH_QUEUE}', r.tag)
), done AS (
    INSERT INTO completed_job (id, workspace, kind, script_path, script_hash, language, content,
        args, tag, priority, created_by, created_at, scheduled_for, started_at, worker, status,
        result, error, duration_ms, cpu_ms, mem_peak, outcome, restarts, canceled_by,
        canceled_reason, concurrency_key)
    SELECT q.id, q.workspace, q.kind, q.script_path, q.script_hash, q.language,
           CASE WHEN q.kind = 'script' THEN NULL ELSE q.content END,
           q.args, q.tag, q.priority, q.created_by, q.created_at, q.scheduled_for,
           -- a job held ahead that ended before its start stamp came in (one statement in
           -- flight stamps it, another completes it): its start as the worker saw it
           coalesce(q.started_at, i.started, now() - make_interval(secs => i.duration_ms / 1000.0)),
           q.worker, CASE WHEN q.canceled THEN 'canceled' ELSE i.status END, i.result,
           CASE WHEN q.canceled THEN coalesce('canceled: ' || q.canceled_reason, 'canceled')
                ELSE i.error END,
           i.duration_ms, i.cpu_ms, i.mem_peak, i.outcome, q.restarts, q.canceled_by,
           q.canceled_reason, q.concurrency_key
      FROM gone q JOIN i ON i.id = q.id
    RETURNING id, status
)"""


_COMPLETE = "WITH " + _complete_ctes(1) + "\nSELECT id, status FROM done"

# Completion and the next claims in one statement (so one round trip and one commit per
# batch): a busy slot hands in its job and gets its next one back, or (claim ahead) hands
# in its job, says that the job it held ahead starts now ($18, $19: start stamps) and gets
# the one to hold next. The claim reads the queue as it was when the statement began, so a
# keyed job whose slot this very batch gives back is not seen as free: its completion
# NOTIFYs wakes a puller for it.
_COMPLETE_AND_CLAIM = "WITH " + _claim_ctes(ahead=16) + "," + _complete_ctes(6) + """,
started AS (
    -- the caller never stamps a job this statement completes (one row, one change). No
    -- indexed column changes (not last_ping: the claim set it, the heartbeat takes over),
    -- so the new row version can stay on its page without new index entries (HOT). The
    -- time is the worker's: two statements in flight may run in either order, and the
    -- starts they record must be in the order the jobs started
    UPDATE queue SET started_at = s.at
      FROM unnest($18::uuid[], $19::timestamptz[]) AS s(id, at)
     WHERE queue.id = ANY($18::uuid[]) AND queue.id = s.id AND worker = $2 AND started_at IS NULL
)
SELECT CASE WHEN coalesce(c.rank, 1) = 1 THEN d.done_ids END AS done_ids,
       CASE WHEN coalesce(c.rank, 1) = 1 THEN d.done_status END AS done_status, c.*
  FROM (SELECT array_agg(id) AS done_ids, array_agg(status) AS done_status FROM done) d
  -- the completions ride on the best claim's row only (not n claims x n completions to
  -- decode); with no claim, on the one row of NULLs
  LEFT JOIN claimed c ON true
"""
_COMPLETE_AND_CLAIM_ONE_TAG = _one_tag(_COMPLETE_AND_CLAIM)


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


async def complete_many(db: Executor, done: list[Completion]) -> dict[uuid.UUID, str]:
    """Move running jobs to completed_job in one statement. Returns each completed job's
    final status (a job canceled while running completes as ``canceled``); a job that is
    not its worker's any more (the monitor gave it away) is left alone and absent."""
    if not done:
        return {}
    rows = await db.fetch(_COMPLETE, *_completion_arrays(done))
    return {r["id"]: r["status"] for r in rows}


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
    run now)."""
    bases, plain, pairs = split_tags(tags)
    sql = _COMPLETE_AND_CLAIM_ONE_TAG if len(bases) == 1 else _COMPLETE_AND_CLAIM
    rows = await db.fetch(sql, bases, worker, plain, pairs, want, *_completion_arrays(done),
                          ahead, float(ahead_after_s), [j for j, _ in starting or []],
                          [at for _, at in starting or []])
    # one row carries the completions (none has them when nothing was completed)
    first = next((r for r in rows if r["done_ids"] is not None), None)
    statuses = dict(zip(first["done_ids"], first["done_status"])) if first else {}
    return statuses, _best_first((r for r in rows if r["id"] is not None), drop=("done_ids", "done_status"))


async def prepare_worker_statements(db: Executor, worker: str, tags: list[str]) -> None:
    """Run a worker's claim and completion statements once with nothing to claim or
    complete. On its first use on a connection, a statement is parsed and asyncpg looks up
    its array types (uuid[], int[]: 20 ms in all here): done at start, on the connections
    kept for claims and completions, that is not on the first jobs' path, nor on the
    last ones' when a third statement at once takes a new connection."""
    await complete_and_pull(db, [], worker, tags, 0)
    await pull_many(db, worker, tags, 0)
    bases, plain, pairs = split_tags(tags)  # the claim of jobs to hold ahead, for none
    await db.fetch(_PULL_MANY_AHEAD_ONE_TAG if len(bases) == 1 else _PULL_MANY_AHEAD,
                   bases, worker, plain, pairs, 0, 0, 0.0)
    await db.fetch(_COMPLETE, *_completion_arrays([]))


def _completion_arrays(done: list[Completion]) -> list[list[Any]]:
    """The ten parameter arrays of _complete_ctes, one element per job."""
    return [[c.job_id for c in done], [c.worker for c in done], [c.status for c in done],
            [_json(c.result) for c in done], [c.error for c in done], [c.duration_ms for c in done],
            [c.cpu_ms for c in done], [c.mem_peak_kb for c in done], [_json(c.outcome) for c in done],
            [c.started_at for c in done]]


def _json(v: Any) -> str | None:
    return None if v is None else json.dumps(v)


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


async def append_logs(db: Executor, job_id: uuid.UUID, chunks: list[str]) -> None:
    """Append a batch of log text in one statement."""
    if chunks:
        await db.execute("INSERT INTO job_logs (job_id, chunk) VALUES ($1, $2)", job_id, "".join(chunks))


async def ping_job(db: Executor, job_id: uuid.UUID, worker: str) -> str:
    """Heartbeat of a running job: 'ok', 'canceled' (kill it), or 'lost' (not ours any more)."""
    canceled = await db.fetchval(
        "UPDATE queue SET last_ping = now() WHERE id = $1 AND worker = $2 AND running"
        " RETURNING canceled",
        job_id, worker,
    )
    if canceled is None:
        return "lost"
    return "canceled" if canceled else "ok"


_CANCEL_QUEUED = f"""
WITH q AS (
    DELETE FROM queue WHERE id = $1 AND workspace = $2 AND NOT running RETURNING *
)
INSERT INTO completed_job (id, workspace, kind, script_path, script_hash, language, content,
    args, tag, priority, created_by, created_at, scheduled_for, status, error, restarts,
    canceled_by, canceled_reason, concurrency_key, result)
SELECT id, workspace, kind, script_path, script_hash, language,
       CASE WHEN kind = 'script' THEN NULL ELSE content END, args, tag, priority, created_by,
       created_at, scheduled_for, 'canceled', 'canceled: ' || $4, restarts, $3, $4,
       concurrency_key, jsonb_build_object('error', jsonb_build_object(
           'name', 'Canceled', 'message', 'canceled by ' || $3 || ': ' || $4))
  FROM q
RETURNING id, pg_notify('{CH_DONE}', id::text)
"""

_CANCEL_RUNNING = f"""
UPDATE queue SET canceled = true, canceled_by = $3, canceled_reason = $4
 WHERE id = $1 AND workspace = $2 AND running
RETURNING id, pg_notify('{CH_CANCEL}', id::text)
"""


async def cancel(db: Executor, workspace: str, job_id: uuid.UUID, by: str, reason: str) -> str | None:
    """Cancel a job. A queued job completes as canceled at once ('canceled'); a running
    one is flagged and its worker kills it ('canceling'). None if no such queued job."""
    if await db.fetchrow(_CANCEL_QUEUED, job_id, workspace, by, reason):
        return "canceled"
    if await db.fetchrow(_CANCEL_RUNNING, job_id, workspace, by, reason):
        return "canceling"
    return None


async def requeue(db: Executor, job_id: uuid.UUID, worker: str) -> bool:
    """Give a running job back to the queue (its worker is shutting down), or a job held
    ahead that its worker will not start."""
    return await db.fetchrow(_REQUEUE, job_id, worker, 0) is not None


async def requeue_stale(db: Executor, ping_timeout_s: float, max_restarts: int) -> list[dict]:
    """Put back in the queue every running job whose heartbeat is older than the timeout,
    counting the restart; a job past ``max_restarts`` fails with a message saying why.
    Returns what it did, one dict per job."""
    async with _tx(db) as conn:
        stale = await conn.fetch(
            "SELECT id, worker, restarts, started_at IS NOT NULL AS started FROM queue WHERE running"
            " AND last_ping < now() - make_interval(secs => $1) FOR UPDATE SKIP LOCKED",
            float(ping_timeout_s),
        )
        done = []
        for r in stale:
            if not r["started"]:  # held ahead by a worker that died before starting it
                await conn.fetchrow(_REQUEUE, r["id"], r["worker"], 0)
                done.append({"id": r["id"], "action": "requeued", "worker": r["worker"]})
            elif r["restarts"] >= max_restarts:
                msg = (f"worker {r['worker']} died while running this job"
                       f" ({r['restarts'] + 1} times; restart limit {max_restarts} reached)")
                await conn.execute(
                    "UPDATE queue SET restarts = restarts + 1 WHERE id = $1", r["id"]
                )
                await complete(conn, r["id"], r["worker"], status="failure",
                               result={"error": {"name": "WorkerDied", "message": msg}}, error=msg,
                               duration_ms=0, cpu_ms=0, mem_peak_kb=0, outcome=None)
                done.append({"id": r["id"], "action": "failed", "worker": r["worker"]})
            else:
                await conn.fetchrow(_REQUEUE, r["id"], r["worker"], 1)
                await conn.execute(
                    "INSERT INTO job_logs (job_id, chunk) VALUES ($1, $2)", r["id"],
                    f"\n[sandmill] worker {r['worker']} stopped answering; job put back in the queue\n",
                )
                done.append({"id": r["id"], "action": "requeued", "worker": r["worker"]})
        return done


class _tx:
    """A transaction on a connection or on a connection taken from a pool."""

    def __init__(self, db: Executor):
        self.db, self.conn, self.tr = db, None, None

    async def __aenter__(self) -> asyncpg.Connection:
        self.conn = await self.db.acquire() if isinstance(self.db, asyncpg.Pool) else self.db
        self.tr = self.conn.transaction()
        await self.tr.start()
        return self.conn

    async def __aexit__(self, typ, exc, tb) -> None:
        try:
            if exc is None:
                await self.tr.commit()
            else:
                await self.tr.rollback()
        finally:
            if isinstance(self.db, asyncpg.Pool):
                await self.db.release(self.conn)


# ---- reads ---------------------------------------------------------------------------------

async def get_job(db: Executor, workspace: str, job_id: uuid.UUID) -> dict[str, Any] | None:
    """The job, queued or completed, with ``type`` 'QueuedJob' or 'CompletedJob'."""
    row = await db.fetchrow("SELECT * FROM queue WHERE id = $1 AND workspace = $2", job_id, workspace)
    if row:
        return {"type": "QueuedJob", **dict(row)}
    row = await db.fetchrow(
        "SELECT * FROM completed_job WHERE id = $1 AND workspace = $2", job_id, workspace
    )
    return {"type": "CompletedJob", **dict(row)} if row else None


async def get_completed(db: Executor, workspace: str, job_id: uuid.UUID) -> dict[str, Any] | None:
    row = await db.fetchrow(
        "SELECT id, status, result, error FROM completed_job WHERE id = $1 AND workspace = $2",
        job_id, workspace,
    )
    return dict(row) if row else None


async def job_state(db: Executor, workspace: str, job_id: uuid.UUID) -> dict[str, Any] | None:
    """Cheap state for result polling: started/completed/success/result."""
    row = await db.fetchrow(
        "SELECT true AS completed, true AS started, status = 'success' AS success, result"
        "  FROM completed_job WHERE id = $1 AND workspace = $2"
        " UNION ALL "
        "SELECT false, started_at IS NOT NULL, NULL, NULL FROM queue WHERE id = $1 AND workspace = $2",
        job_id, workspace,
    )
    return dict(row) if row else None


async def get_logs(db: Executor, job_id: uuid.UUID, after_id: int = 0) -> tuple[str, int]:
    """Log text appended after log row ``after_id``, and the last row id (the next offset)."""
    row = await db.fetchrow(
        "SELECT coalesce(string_agg(chunk, '' ORDER BY id), '') AS text, coalesce(max(id), $2) AS last"
        "  FROM job_logs WHERE job_id = $1 AND id > $2",
        job_id, after_id,
    )
    return row["text"], row["last"]


async def list_jobs(
    db: Executor,
    workspace: str,
    *,
    limit: int = 50,
    script_path: str | None = None,
    success: bool | None = None,
    running: bool | None = None,
) -> list[dict[str, Any]]:
    """Recent jobs, queued and completed, newest first."""
    rows = await db.fetch(
        """
        SELECT * FROM (
          SELECT 'QueuedJob' AS type, id, workspace, kind, script_path, language, tag, priority,
                 created_at, started_at, NULL::timestamptz AS completed_at, running, worker,
                 NULL::text AS status, NULL::int AS duration_ms, NULL::int AS mem_peak
            FROM queue WHERE workspace = $1
          UNION ALL
          SELECT 'CompletedJob', id, workspace, kind, script_path, language, tag, priority,
                 created_at, started_at, completed_at, false, worker, status, duration_ms, mem_peak
            FROM completed_job WHERE workspace = $1
        ) j
        WHERE ($2::text IS NULL OR script_path = $2)
          AND ($3::bool IS NULL OR (status = 'success') = $3)
          AND ($4::bool IS NULL OR running = $4)
        ORDER BY created_at DESC
        LIMIT $5
        """,
        workspace, script_path, success, running, limit,
    )
    return [dict(r) for r in rows]


async def key_has_slot(db: Executor, job_id: uuid.UUID) -> bool:
    """Could this waiting job's concurrency key let it start now?"""
    return await db.fetchval(
        "SELECT ck.key IS NULL OR sandmill_has_slot(ck.running, ck.starts, q.concurrent_limit,"
        "       coalesce(q.concurrency_time_window_s, 0))"
        "  FROM queue q LEFT JOIN concurrency_key ck ON ck.key = q.concurrency_key WHERE q.id = $1",
        job_id,
    ) is not False


async def queued_tags_without_workers(db: Executor, tags: list[str],
                                      workspace: str | None = None) -> list[str]:
    """Of ``tags``, those no worker that pinged recently serves (for ``workspace``, when
    given: a worker tag ``t(ws1+ws2)`` serves t for those workspaces only)."""
    rows = await db.fetch(
        "SELECT t FROM unnest($1::text[]) t WHERE NOT EXISTS ("
        " SELECT 1 FROM worker w WHERE w.last_ping > now() - interval '60 seconds'"
        "   AND (t = ANY(w.tags) OR EXISTS (SELECT 1 FROM unnest(w.tags) wt"
        "     WHERE left(wt, length(t) + 1) = t || '(' AND right(wt, 1) = ')'"
        "       AND ($2::text IS NULL OR $2 = ANY(string_to_array("
        "             substr(wt, length(t) + 2, length(wt) - length(t) - 2), '+'))))))",
        tags, workspace,
    )
    return [r["t"] for r in rows]


# ---- worker lifecycle jobs (init / periodic scripts) ----------------------------------------

_INSERT_COMPLETED = f"""
WITH j AS (
    INSERT INTO completed_job (id, workspace, kind, language, content, args, tag, created_by,
        created_at, scheduled_for, started_at, worker, status, result, error, duration_ms,
        cpu_ms, mem_peak, outcome)
    VALUES ($1, $2, $3, $4, $5, '{{}}', $6, $7, $8, $8, $8, $7, $9, $10, $11, $12, $13, $14, $15)
    RETURNING id
), l AS (
    INSERT INTO job_logs (job_id, chunk) SELECT $1, $16 WHERE $16 <> ''
)
SELECT id, pg_notify('{CH_DONE}', id::text) FROM j
"""


async def insert_completed(
    db: Executor,
    *,
    workspace: str,
    kind: str,
    language: str,
    content: str,
    tag: str,
    worker: str,
    started_at: dt.datetime,
    status: str,
    result: Any,
    error: str | None,
    logs: str,
    duration_ms: int = 0,
    cpu_ms: int = 0,
    mem_peak_kb: int = 0,
    outcome: dict[str, Any] | None = None,
) -> uuid.UUID:
    """Record a job that a worker ran on its own (its init or periodic script) directly as
    completed, with its logs, in one statement. Returns the job id."""
    job_id = uuid.uuid4()
    await db.fetchrow(
        _INSERT_COMPLETED, job_id, workspace, kind, language, content, tag, worker, started_at,
        status, result, error, duration_ms, cpu_ms, mem_peak_kb, outcome, logs,
    )
    return job_id


# ---- gauges and small reads for the API -----------------------------------------------------

async def counts(db: Executor) -> dict[str, int]:
    """Jobs waiting and running, and workers alive (pinged in the last 60 s)."""
    row = await db.fetchrow(
        "SELECT (SELECT count(*) FROM queue WHERE NOT running) AS queued,"
        " (SELECT count(*) FROM queue WHERE running) AS running,"
        " (SELECT count(*) FROM worker WHERE last_ping > now() - interval '60 seconds') AS workers")
    return dict(row)


async def is_future(db: Executor, when: dt.datetime) -> bool:
    """Is ``when`` still to come by the database's clock (the one scheduled_for is set by)?"""
    return bool(await db.fetchval("SELECT $1::timestamptz > now()", when))
