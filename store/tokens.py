"""Workspace tokens: create (returns the token once), authenticate, list, revoke.

A token reads ``smt_<prefix>_<secret>``: the prefix (12 hex digits) names it in lists and
revocations and is the key of its row; the secret is 256 random bits. Only the sha256 of
the whole token is stored, so a token cannot be read back, even from the database; a
high-entropy secret needs no slow hash. The statements are in sql/tokens.sql.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from typing import Any

from .queries import Executor, sql

_CREATE = sql("create_token")
_AUTH = sql("auth_token")
_LIST = sql("list_tokens")
_DELETE = sql("delete_token")

TOKEN_RE = re.compile(r"^smt_([0-9a-f]{12})_([A-Za-z0-9_\-]{43})$")


def token_hash(token: str) -> bytes:
    """What is stored of a token: the sha256 of all of it."""
    return hashlib.sha256(token.encode()).digest()


def parse(token: str) -> str | None:
    """The prefix of a well-formed token, else None."""
    m = TOKEN_RE.match(token)
    return m.group(1) if m else None


async def create(db: Executor, *, label: str, workspace: str, scopes: list[str],
                 expires_at: dt.datetime | None) -> tuple[str, dict[str, Any]]:
    """A new token for ``workspace``: (the token, its row). The token is returned only here."""
    while True:  # a prefix drawn twice (1 in 2^48) is drawn again
        prefix = secrets.token_hex(6)
        token = f"smt_{prefix}_{secrets.token_urlsafe(32)}"
        row = await db.fetchrow(_CREATE, prefix, token_hash(token), label, workspace, scopes, expires_at)
        if row:
            return token, dict(row)


async def authenticate(db: Executor, token: str) -> dict[str, Any] | None:
    """The row of a stored token (with ``expired``), or None for a token that is not one."""
    prefix = parse(token)
    if prefix is None:
        return None
    row = await db.fetchrow(_AUTH, prefix, token_hash(token))
    return dict(row) if row else None


async def list_tokens(db: Executor, workspace: str | None = None) -> list[dict[str, Any]]:
    return [dict(r) for r in await db.fetch(_LIST, workspace)]


async def delete(db: Executor, prefix: str) -> dict[str, Any] | None:
    """Revoke the token with ``prefix``; its row, or None if there was none."""
    row = await db.fetchrow(_DELETE, prefix)
    return dict(row) if row else None
