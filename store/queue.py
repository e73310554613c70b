"""The job SQL of sandmill, as one stable module: push, claim, complete, logs, heartbeats,
cancel, reads. The API, the monitor, the workers, the tests and the benchmarks use it as
``from sandmill.store import queue`` and call ``queue.<name>``.

It only re-exports; the code lives in satellites of one job each:

- ``claims``: the worker's hot path (pull, pull_many, complete_many, complete_and_pull,
  prepare_worker_statements, split_tags, CLAIM_SETTINGS, Completion)
- ``jobs``: the other writes (push, cancel, requeue, requeue_stale, ping_job, append_logs,
  insert_completed)
- ``reads``: reads and gauges (get_job, job_state, get_logs, list_jobs, next_due, ...)
- ``queries``: the statements (named, in sql/*.sql), the NOTIFY channels, Executor

Every function takes an asyncpg connection (or pool) as its first argument. Callers look
names up here at call time (``queue.append_logs(...)``), so a test may monkeypatch them
on this module.
"""

from __future__ import annotations

from .claims import (
    CLAIM_SETTINGS,
    Completion,
    complete,
    complete_and_pull,
    complete_many,
    prepare_worker_statements,
    pull,
    pull_many,
    split_tags,
)
from .jobs import append_logs, cancel, insert_completed, ping_job, push, requeue, requeue_stale
from .queries import CH_CANCEL, CH_DONE, CH_QUEUE, Executor
from .reads import (
    counts,
    get_completed,
    get_job,
    get_logs,
    is_future,
    job_state,
    key_has_slot,
    list_jobs,
    next_due,
    queued_tags_without_workers,
)

# For the tests that read plans or run a statement by hand.
from .claims import _COMPLETE, _PULL_MANY, _PULL_MANY_ONE_TAG, _completion_arrays  # noqa: E402,F401

__all__ = [
    "CH_CANCEL", "CH_DONE", "CH_QUEUE", "CLAIM_SETTINGS", "Completion", "Executor",
    "append_logs", "cancel", "complete", "complete_and_pull", "complete_many", "counts",
    "get_completed", "get_job", "get_logs", "insert_completed", "is_future", "job_state",
    "key_has_slot", "list_jobs", "next_due", "ping_job", "prepare_worker_statements", "pull",
    "pull_many", "push", "queued_tags_without_workers", "requeue", "requeue_stale",
    "split_tags",
]
