"""Request bodies and their checks: scripts, previews, cancels, worker group configs."""

from __future__ import annotations

import ast
import re
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sandmill.profiles import Profile  # the one profile model, shared with the workers

from .routing import LANGUAGES


class ScriptCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")  # Windmill clients send more fields than we use

    path: str = Field(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_\-./]+$")
    content: str
    language: str
    summary: str = ""
    description: str = ""
    tag: str | None = None
    priority: int | None = Field(None, ge=1, le=100)
    timeout: float | None = Field(None, gt=0)
    concurrent_limit: int | None = Field(None, ge=1)
    concurrency_time_window_s: int | None = Field(None, ge=0)
    concurrency_key: str | None = None

    @model_validator(mode="after")
    def _concurrency(self) -> "ScriptCreate":
        if self.concurrent_limit is None and (self.concurrency_key or self.concurrency_time_window_s):
            raise ValueError("concurrency_key and concurrency_time_window_s need concurrent_limit")
        return self


class Preview(BaseModel):
    model_config = ConfigDict(extra="ignore")

    content: str
    language: str
    args: dict[str, Any] = Field(default_factory=dict)
    tag: str | None = None


class CancelBody(BaseModel):
    reason: str | None = None


def check_code(language: str, content: str) -> None:
    """Refuse what can never run: unknown language, python that does not parse or has no
    main. Raises HTTPException 400 with the reason (the line, for a syntax error)."""
    if language not in LANGUAGES:
        raise HTTPException(400, f"unknown language {language!r}; known: {', '.join(LANGUAGES)}")
    if language == "python3":
        try:
            tree = ast.parse(content, "main.py")
        except SyntaxError as e:
            raise HTTPException(400, f"python syntax error at line {e.lineno}: {e.msg}") from None
        if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "main"
                   for n in tree.body):
            raise HTTPException(400, "the script defines no main(...) function")


def check_args(args: Any) -> dict[str, Any]:
    if not isinstance(args, dict):
        raise HTTPException(422, f"args must be a JSON object, got {type(args).__name__}")
    return args


GROUP_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


def validate_group_config(group: str, body: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Check a partial profile against the profile model. Returns (the config to store:
    the fields given, [{field, reason}] for each bad field)."""
    if not isinstance(body, dict):
        return {}, [{"field": "body", "reason": f"a group config is a JSON object of profile fields,"
                                                 f" got {type(body).__name__}"}]
    if body.get("name", group) != group:
        return {}, [{"field": "name", "reason": f"must be {group!r} (the group) or left out"}]
    try:
        Profile.model_validate({"tags": ["_placeholder"], **body, "name": group})
    except ValidationError as e:
        return {}, [{"field": ".".join(str(x) for x in err["loc"]) or "(top level)", "reason": err["msg"]}
                    for err in e.errors()]
    return {k: v for k, v in body.items() if k != "name"}, []
