"""Tokens and identity, on Windmill's paths: the admin creates, lists and revokes workspace
tokens; any valid token asks who it is."""

from __future__ import annotations

import datetime as dt
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import PlainTextResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

from sandmill.store import tokens

from ..deps import WORKSPACE_SCOPES, Admin, Pool, User
from .errors import AUTHED, TEXT, error

router = APIRouter(prefix="/api/users", tags=["users"], responses=AUTHED)

WORKSPACE_ID = r"^[A-Za-z0-9_\-]+$"


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")  # Windmill clients send more fields than we use

    label: str = Field("token", min_length=1, max_length=100)
    expiration: AwareDatetime | None = Field(
        None, description="RFC 3339 timestamp with its time zone; null: never expires")
    scopes: list[str] | None = Field(
        None, description=f"default: all workspace scopes ({', '.join(WORKSPACE_SCOPES)})")
    workspace_id: str = Field(min_length=1, max_length=100, pattern=WORKSPACE_ID)

    @field_validator("scopes")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            bad = [s for s in v if s not in WORKSPACE_SCOPES]
            if bad:
                raise ValueError(f"unknown scope(s) {', '.join(map(repr, bad))};"
                                 f" known: {', '.join(WORKSPACE_SCOPES)}")
            if not v:
                raise ValueError("a token needs at least one scope (leave scopes out for all)")
        return v

    @field_validator("expiration")
    @classmethod
    def _future(cls, v: dt.datetime | None) -> dt.datetime | None:
        if v is not None and v <= dt.datetime.now(dt.timezone.utc):
            raise ValueError(f"{v.isoformat()} is in the past")
        return v


class TokenInfo(BaseModel):
    """A token as listed: everything but the token itself."""
    label: str
    prefix: str
    workspace_id: str
    scopes: list[str]
    created_at: dt.datetime
    expiration: dt.datetime | None
    last_used_at: dt.datetime | None
    expired: bool


class WhoAmI(BaseModel):
    """The caller: the admin, or a workspace token (its label, prefix, workspace, scopes)."""
    is_admin: bool
    username: str  # Windmill's field: "admin", or the token's label/prefix
    label: str
    prefix: str | None
    workspace_id: str | None  # None: every workspace (the admin)
    scopes: list[str]
    expiration: dt.datetime | None


@router.post("/tokens/create", response_class=PlainTextResponse, status_code=201,
             responses={201: TEXT})
async def create_token(body: TokenCreate, _a: Admin, pool: Pool) -> str:
    """A new token for one workspace, answered once as plain text (only its hash is kept)."""
    scopes = list(dict.fromkeys(body.scopes)) if body.scopes else list(WORKSPACE_SCOPES)
    token, _row = await tokens.create(pool, label=body.label, workspace=body.workspace_id,
                                      scopes=scopes, expires_at=body.expiration)
    return token


@router.get("/tokens/list", response_model=list[TokenInfo])
async def list_tokens(_a: Admin, pool: Pool,
                      workspace_id: str | None = Query(None, max_length=100)) -> list[dict[str, Any]]:
    """Every token (or a workspace's): label, prefix, scopes, dates; never the token."""
    return [{"label": r["label"], "prefix": r["prefix"], "workspace_id": r["workspace"],
             "scopes": r["scopes"], "created_at": r["created_at"], "expiration": r["expires_at"],
             "last_used_at": r["last_used_at"], "expired": r["expired"]}
            for r in await tokens.list_tokens(pool, workspace_id)]


@router.delete("/tokens/delete/{prefix}", response_class=PlainTextResponse,
               responses={200: TEXT, 404: error("no token with this prefix")})
async def delete_token(prefix: str, _a: Admin, pool: Pool) -> str:
    """Revoke a token: from its next request on, it is refused (401)."""
    row = await tokens.delete(pool, prefix)
    if row is None:
        raise HTTPException(404, f"no token with prefix {prefix!r}")
    return f"token {row['label']!r} ({prefix}) of workspace {row['workspace']} deleted"


@router.get("/whoami", response_model=WhoAmI)
async def whoami(u: User) -> dict[str, Any]:
    """Who the token is: the admin, or a workspace token with its scopes."""
    return {"is_admin": u.admin, "username": u.name, "label": u.label, "prefix": u.prefix,
            "workspace_id": u.workspace, "scopes": list(u.scopes), "expiration": u.expires_at}
