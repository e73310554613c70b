"""Request bodies and their checks: scripts, previews, cancels, worker group configs."""

from __future__ import annotations

import ast
import re
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandmill.profiles import Profile  # the one profile model, shared with the workers
from sandmill.store.storable import describe_text, find_unstorable

from .routing import LANGUAGES


# What PostgreSQL cannot store (NUL, lone surrogates, NaN: sandmill.store.storable) is
# refused at the door with the field named, where the INSERT would fail (a 503) or the
# worker would fail the job later.
def text_problem(s: str) -> str | None:
    """Why PostgreSQL cannot store the string ``s``, or None."""
    what = describe_text(s)
    return f"holds {what}, which PostgreSQL cannot store" if what else None


def json_problem(value: Any, path: str) -> str | None:
    """``path: reason`` for the first string, key or number in ``value`` PostgreSQL cannot
    store, or None."""
    found = find_unstorable(value, path)
    if found is None:
        return None
    what, where = found
    return f"{where}: holds {what}, which PostgreSQL cannot store"


class _Storable(BaseModel):
    """A request body whose every string field must be storable (text_problem)."""

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, v: Any, info: Any) -> Any:
        if isinstance(v, str):
            problem = text_problem(v)
        else:
            problem = json_problem(v, info.field_name) if isinstance(v, (dict, list)) else None
        if problem:
            raise ValueError(problem)
        return v


class ScriptCreate(_Storable):
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
    # its jobs go to the worker group dedicated to it (tag '<workspace>:<path>'; worker/dedicated.py)
    dedicated_worker: bool = False

    @model_validator(mode="after")
    def _concurrency(self) -> "ScriptCreate":
        if self.concurrent_limit is None and (self.concurrency_key or self.concurrency_time_window_s):
            raise ValueError("concurrency_key and concurrency_time_window_s need concurrent_limit")
        if self.dedicated_worker and self.language != "python3":
            raise ValueError(f"dedicated_worker: only python3 scripts have a cold start for a dedicated"
                             f" worker to remove; {self.language} jobs start without one")
        if self.dedicated_worker and self.concurrent_limit is not None:
            raise ValueError("dedicated_worker: a dedicated script takes no concurrent_limit (its"
                             " worker runs its jobs one after another per subworker)")
        return self


class Preview(_Storable):
    model_config = ConfigDict(extra="ignore")

    content: str
    language: str
    args: dict[str, Any] = Field(default_factory=dict)
    tag: str | None = None


class CancelBody(_Storable):
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
    """The job's args: a JSON object PostgreSQL can store, else HTTPException 422 naming
    the arg and the reason."""
    if not isinstance(args, dict):
        raise HTTPException(422, f"args must be a JSON object, got {type(args).__name__}")
    if problem := json_problem(args, "args"):
        raise HTTPException(422, f"invalid args: {problem}")
    return args


def check_text(field: str, value: str | None) -> None:
    """Raise HTTPException 422 naming ``field`` when PostgreSQL cannot store ``value``."""
    if value is not None and (problem := text_problem(value)):
        raise HTTPException(422, f"{field} {problem}")


GROUP_RE = re.compile(r"^[a-z0-9][a-z0-9_\-]*$")


def validate_group_config(group: str, body: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Check a partial profile against the profile model. Returns (the config to store:
    the fields given, [{field, reason}] for each bad field)."""
    if not isinstance(body, dict):
        return {}, [{"field": "body", "reason": f"a group config is a JSON object of profile fields,"
                                                 f" got {type(body).__name__}"}]
    if problem := json_problem(body, "config"):  # NUL, lone surrogates: the config table's jsonb refuses them
        where, _, reason = problem.partition(": ")
        return {}, [{"field": where.removeprefix("config.") or "(top level)", "reason": reason}]
    if body.get("name", group) != group:
        return {}, [{"field": "name", "reason": f"must be {group!r} (the group) or left out"}]
    try:
        # a group dedicated to scripts has no tags of its own
        placeholder = [] if body.get("dedicated_worker") or body.get("dedicated_workers") else ["_placeholder"]
        Profile.model_validate({"tags": placeholder, **body, "name": group})
    except ValidationError as e:
        return {}, [{"field": ".".join(str(x) for x in err["loc"]) or "(top level)", "reason": err["msg"]}
                    for err in e.errors()]
    return {k: v for k, v in body.items() if k != "name"}, []
