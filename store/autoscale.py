"""The autoscaler's store: the groups it knows, the jobs waiting for a group's tags, its
workers' occupancy, the count asked for, the events, and the one-server lock.

The statements are in sql/autoscale.sql."""

from __future__ import annotations

from typing import Any

from .claims import split_tags
from .queries import Executor, sql

# pg_try_advisory_lock key of the autoscaler (any constant no other lock of sandmill uses)
LOCK_KEY = 0x5A4D_A5CA_1E00

_TRY_LOCK = sql("autoscale_try_lock")
_PUBLISH = sql("autoscale_publish_group")
_GROUPS = sql("autoscale_groups")
_CONFIG_ONLY = sql("autoscale_config_only_groups")
_WAITING = sql("autoscale_jobs_waiting")
_GROUP_WORKERS = sql("autoscale_group_workers")
_SET_DESIRED = sql("autoscale_set_desired")
_INSERT_EVENT = sql("autoscale_insert_event")
_LIST_EVENTS = sql("autoscale_list_events")
_DESIRED = sql("autoscale_desired")
_RUNNING_PER_WORKER = sql("autoscale_running_per_worker")
_GROUP_FOR_TAG = sql("autoscale_group_for_tag")
_LIST_GROUPS = sql("autoscale_list_groups")


def tag_sets(tags: list[str]) -> tuple[list[str], list[str]]:
    """A group's tags as the counts need them: (plain tags, 'tag(ws)' pairs)."""
    _bases, plain, pairs = split_tags(tags)
    return plain, pairs


async def try_lock(conn: Executor) -> bool:
    """Take the autoscaler's lock on this connection (a session lock: held until it
    closes) unless another server's connection holds it."""
    return bool(await conn.fetchval(_TRY_LOCK, LOCK_KEY))


async def publish_group(db: Executor, group: str, profile: dict[str, Any], enabled: bool,
                        tags: list[str]) -> None:
    """Publish a group's profile (from a server's profile files) and the tags it serves."""
    plain, pairs = tag_sets(tags)
    await db.execute(_PUBLISH, group, profile, enabled, plain, pairs)


async def groups(db: Executor) -> list[dict[str, Any]]:
    """Every published group (profile, desired, last event type, seconds since the last
    change, its stored config), then the groups only a stored config defines."""
    rows = [dict(r) for r in await db.fetch(_GROUPS)]
    for r in await db.fetch(_CONFIG_ONLY):
        rows.append({"worker_group": r["worker_group"], "profile": {}, "desired": None,
                     "last_event_type": None, "since_change_s": None, "config": r["config"]})
    return rows


async def jobs_waiting(db: Executor, tags: list[str]) -> int:
    """Jobs due and not running for ``tags`` (a 'tag(ws1+ws2)' counts tag's jobs of those
    workspaces only)."""
    plain, pairs = tag_sets(tags)
    return int(await db.fetchval(_WAITING, plain, pairs))


async def group_workers(db: Executor, group: str, alive_within_s: float) -> dict[str, Any]:
    """The group's live workers: ``workers`` (count) and ``occ_15s``, ``occ_5m``, ``occ_30m``
    (weighted by subworkers; None when there are none)."""
    return dict(await db.fetchrow(_GROUP_WORKERS, group, float(alive_within_s)))


async def set_desired(db: Executor, group: str, tags: list[str], desired: int, event_type: str) -> None:
    """Record the count asked for ``group`` (what the supervisor of `sandmill up` follows)."""
    plain, pairs = tag_sets(tags)
    await db.execute(_SET_DESIRED, group, plain, pairs, desired, event_type)


async def insert_event(db: Executor, *, group: str, event_type: str, from_workers: int,
                       desired: int, reason: str, integration: str, status: str, output: str,
                       server: str) -> int:
    """Record one event; returns its id."""
    return await db.fetchval(_INSERT_EVENT, group, event_type, from_workers, desired, reason,
                             integration, status, output, server)


async def list_events(db: Executor, group: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The latest events, newest first (of ``group``, or all)."""
    return [dict(r) for r in await db.fetch(_LIST_EVENTS, group, limit)]


async def desired_counts(db: Executor, groups_: list[str]) -> dict[str, int]:
    """The counts asked for ``groups_`` (those with a decision)."""
    return {r["worker_group"]: r["desired"] for r in await db.fetch(_DESIRED, groups_)}


async def running_per_worker(db: Executor, group: str) -> dict[str, int]:
    """The group's registered workers, by name, with the jobs each runs or holds."""
    return {r["name"]: r["running"] for r in await db.fetch(_RUNNING_PER_WORKER, group)}


async def group_for_tag(db: Executor, tag: str, workspace: str) -> str | None:
    """The enabled autoscaled group that serves ``tag`` for ``workspace``, if any."""
    return await db.fetchval(_GROUP_FOR_TAG, tag, workspace)


async def list_groups(db: Executor) -> list[dict[str, Any]]:
    """The autoscaled groups and the count each was last asked for."""
    return [dict(r) for r in await db.fetch(_LIST_GROUPS)]
