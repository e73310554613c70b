"""Every SQL statement of sandmill, read once at import from the named queries in
``sql/*.sql``, and what the statements speak: the NOTIFY channels and the executor type.

A file holds statements, each under a header (as procrastinate's queries do)::

    -- name: pull_one_tag
    -- What it does, in one line.
    -- $1 what, $2 what...
    WITH ... ;

The comment lines under the header are its description; the statement runs from the first
other line to the next header, its final semicolon dropped. Comments inside it stay (the
server ignores them). A name given twice, or a name asked for that no file has, fails
loudly: at import, since the store's modules take their statements at import time (as
module-level strings: asyncpg prepares and caches statements by their text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

Executor = asyncpg.Connection | asyncpg.Pool

# NOTIFY channels. Payloads stay tiny; listeners re-read the tables. The statements name
# them literally (checked below: every pg_notify in the SQL uses one of these).
CH_QUEUE = "sandmill_queue"    # payload: the tag of a new job ("tag" or "tag|epoch" if scheduled)
CH_DONE = "sandmill_done"      # payload: a completed job's id, or "<id> <1|0><result JSON>" (server/waiters.py parse_done)
CH_CANCEL = "sandmill_cancel"  # payload: the id of a running job to kill
CH_CONFIG = "sandmill_config"  # payload: the name of a worker group whose config changed
CHANNELS = (CH_QUEUE, CH_DONE, CH_CANCEL, CH_CONFIG)


@dataclass(frozen=True)
class Query:
    name: str
    file: str
    doc: str   # the comment lines under the header
    sql: str   # the statement, as sent


_HEADER = re.compile(r"^--\s*name:\s*(\S+)\s*$", re.M)


def parse(text: str, file: str = "<sql>") -> list[Query]:
    """The named statements of one file, in order."""
    parts = _HEADER.split(text)
    out = []
    for name, body in zip(parts[1::2], parts[2::2]):
        lines = body.strip("\n").splitlines()
        doc = []
        while lines and lines[0].startswith("--"):
            doc.append(lines.pop(0)[2:].strip())
        sql = "\n".join(lines).strip()
        if sql.endswith(";"):
            sql = sql[:-1].rstrip()
        if not sql:
            raise ValueError(f"{file}: statement {name!r} is empty")
        if not doc:
            raise ValueError(f"{file}: statement {name!r} has no description")
        out.append(Query(name, file, "\n".join(doc), sql))
    return out


def load() -> dict[str, Query]:
    """Every named statement shipped in ``sandmill.store/sql``, by name."""
    queries: dict[str, Query] = {}
    files = sorted((f for f in resources.files("sandmill.store").joinpath("sql").iterdir()
                    if f.name.endswith(".sql")), key=lambda f: f.name)
    for f in files:
        for q in parse(f.read_text(encoding="utf-8"), f.name):
            if q.name in queries:
                raise ValueError(f"SQL statement {q.name!r} is defined twice:"
                                 f" in {queries[q.name].file} and in {q.file}")
            queries[q.name] = q
    return queries


QUERIES = load()

_used: set[str] = set()


def sql(name: str) -> str:
    """The text of the statement ``name``; a KeyError naming the files if there is none."""
    try:
        q = QUERIES[name]
    except KeyError:
        raise KeyError(f"no SQL statement named {name!r} in sandmill.store/sql/*.sql") from None
    _used.add(name)
    return q.sql


def _check_channels() -> None:
    for q in QUERIES.values():
        if len(re.findall(r"pg_notify\(", q.sql)) != len(re.findall(r"pg_notify\(\s*'", q.sql)):
            raise ValueError(f"statement {q.name!r} notifies a channel not named literally")
        for ch in re.findall(r"pg_notify\(\s*'([^']*)'", q.sql):
            if ch not in CHANNELS:
                raise ValueError(f"statement {q.name!r} notifies {ch!r}, not one of {CHANNELS}")


_check_channels()
