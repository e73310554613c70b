"""Connections and pools with sandmill's codecs, and the versioned migrations, applied at
start (the embedded PostgreSQL is store/embedded.py)."""

from __future__ import annotations

import logging
import re
from importlib import resources

import asyncpg

log = logging.getLogger("sandmill.db")

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


async def connect(url: str) -> asyncpg.Connection:
    """One connection with sandmill's codecs (jsonb as Python objects)."""
    conn = await asyncpg.connect(url)
    await _init_conn(conn)
    return conn


async def create_pool(url: str, min_size: int = 1, max_size: int = 4,
                      settings: dict[str, str] | None = None) -> asyncpg.Pool:
    """A pool with sandmill's codecs; ``settings``: PostgreSQL settings of its sessions."""
    return await asyncpg.create_pool(url, min_size=min_size, max_size=max_size, init=_init_conn,
                                     reset=_reset, server_settings=settings)


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
