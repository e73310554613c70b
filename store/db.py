"""Connections and pools with sandmill's codecs, and the versioned migrations, applied at
start (the embedded PostgreSQL is store/embedded.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import time
from importlib import resources
from typing import Awaitable, Callable, TypeVar

import asyncpg
from asyncpg import exceptions as pgx

log = logging.getLogger("sandmill.db")
T = TypeVar("T")

# Any fixed number: it only has to be the same in every sandmill process.
_MIGRATION_LOCK = 0x5A4D_0001


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration shipped, in order."""
    out = []
    for f in resources.files("sandmill.store").joinpath("migrations").iterdir():
        m = re.match(r"(\d+)_(.+)\.sql$", f.name)
        if m:
            out.append((int(m.group(1)), m.group(2), f.read_text()))
    return sorted(out)


async def migrate(conn: asyncpg.Connection) -> list[int]:
    """Apply every migration not yet recorded. Safe to run twice and from two processes at
    once: an advisory lock serialises them and each migration commits with its record."""
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS sandmill_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM sandmill_migrations")}
        applied = []
        for version, name, sql in migrations():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO sandmill_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("applied migration %04d_%s", version, name)
            applied.append(version)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


async def migrate_url(url: str) -> list[int]:
    """migrate() the database at ``url``, on a connection of its own."""
    conn = await connect(url)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def session_settings(settings: dict[str, str] | None = None, app_name: str | None = None) -> dict[str, str] | None:
    """``settings`` with the connection's ``application_name``: ``app_name``, else
    PGAPPNAME (as libpq reads it; `sandmill up` sets it for the server), so that
    pg_stat_activity tells a worker's backends ('sandmill-worker GROUP') from the server's
    ('sandmill-server')."""
    name = app_name or os.environ.get("PGAPPNAME")
    if not name:
        return settings
    return {**(settings or {}), "application_name": name[:63]}  # NAMEDATALEN - 1


async def connect(url: str, settings: dict[str, str] | None = None,
                  app_name: str | None = None) -> asyncpg.Connection:
    """One connection with sandmill's codecs (jsonb as Python objects); ``settings``:
    PostgreSQL settings of its session."""
    conn = await asyncpg.connect(url, server_settings=session_settings(settings, app_name))
    await _init_conn(conn)
    return conn


async def create_pool(url: str, min_size: int = 1, max_size: int = 4,
                      settings: dict[str, str] | None = None, app_name: str | None = None) -> asyncpg.Pool:
    """A pool with sandmill's codecs; ``settings``: PostgreSQL settings of its sessions."""
    return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_conn,
                                     reset=_reset, server_settings=session_settings(settings, app_name))


async def _reset(conn: asyncpg.Connection) -> None:
    # asyncpg's default reset is a round trip after every pooled statement (RESET ALL,
    # UNLISTEN *, ...). sandmill never SETs, LISTENs or locks on pooled connections (the
    # listener has its own), so only an abandoned transaction needs undoing.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def _init_conn(conn: asyncpg.Connection) -> None:
    import json

    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


# What a lost or unreachable database raises: the connection refused or cut (OSError,
# ConnectionDoesNotExistError, class 08), the server shutting down or starting up (class
# 57: admin_shutdown, cannot_connect_now), out of connections (class 53), a closed
# connection or pool (InterfaceError). asyncpg's client-side DataError is an
# InterfaceError too, but also a ValueError: a value it cannot send, not an outage.
_DOWN = (OSError, asyncio.TimeoutError, pgx.PostgresConnectionError,
         pgx.OperatorInterventionError, pgx.InsufficientResourcesError)


def is_disconnect(exc: BaseException) -> bool:
    """Whether ``exc`` says the database could not be reached (down, restarting, the
    connection lost), as opposed to a statement it refused (bad data, a constraint):
    the first is worth retrying as it is, the second never is."""
    if isinstance(exc, _DOWN):
        return True
    if isinstance(exc, pgx.InternalClientError):  # a connection left mid-operation by a cut
        return True
    return isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, ValueError)


class Backoff:
    """Waits between retries while the database is unreachable: from ``first_s``,
    doubling up to ``max_s``, with jitter (so that a cluster's workers do not reconnect in
    step); ``elapsed_s`` since the first failure."""

    def __init__(self, first_s: float = 0.05, max_s: float = 1.0):
        self.first_s, self.max_s = first_s, max_s
        self._next = first_s
        self._since: float | None = None

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self._since is None else time.monotonic() - self._since

    async def wait(self) -> None:
        if self._since is None:
            self._since = time.monotonic()
        await asyncio.sleep(self._next * random.uniform(0.5, 1.0))
        self._next = min(self.max_s, self._next * 2)

    def reset(self) -> None:
        self._next, self._since = self.first_s, None


async def until_reachable(connect: Callable[[], Awaitable[T]], give_up_s: float = 60.0) -> T:
    """``connect()``, tried again with backoff while the database is unreachable (it is
    starting, or restarting), for up to ``give_up_s``; then its error is raised."""
    backoff = Backoff()
    while True:
        try:
            return await connect()
        except Exception as e:  # noqa: BLE001 - only an outage is tried again
            if not is_disconnect(e) or backoff.elapsed_s > give_up_s:
                raise
            log.warning("database unreachable (%s); trying again", e)
            await backoff.wait()
