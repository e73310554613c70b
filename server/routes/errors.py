"""The error answers the routes declare in the OpenAPI document: every 4xx and 5xx is a
JSON object with an ``error`` message (the app's exception handlers write them)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class ErrorBody(BaseModel):
    """An error: ``error`` says what and why; ``detail`` lists bad fields, where some are."""
    model_config = ConfigDict(extra="allow")

    error: str
    detail: list[dict[str, Any]] | None = None


_ERROR_SCHEMA = ErrorBody.model_json_schema()


def error(what: str) -> dict[str, Any]:
    """An error answer for a route's ``responses``: ``what`` causes it; the body is ErrorBody,
    as JSON also on the routes that answer text (a ``model`` would take the route's type)."""
    return {"description": what, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}


# Every authenticated route: the caller's token, the request's fields, the database.
AUTHED: dict[int | str, dict[str, Any]] = {
    400: error("a body that is not JSON, or a value the database cannot hold (a NUL character)"),
    401: error("missing, invalid, revoked or expired token"),
    403: error("the token lacks the route's scope, or the route needs the admin token"),
    422: error("invalid request: each bad field and why"),
    503: error("the database is unavailable"),
}
# Routes of a workspace: also its things not found (or another workspace's, for a token).
IN_WORKSPACE: dict[int | str, dict[str, Any]] = {
    **AUTHED,
    400: error("the request cannot run (unknown language, bad code, bad tag), a body that is"
               " not JSON, or a value the database cannot hold"),
    404: error("not found in this workspace (or not this token's workspace)"),
}
# run_wait_result: a failed job answers 400 with its result ({"error": {...}}) as the body.
WAIT: dict[int | str, dict[str, Any]] = {
    200: {"description": "the job's result", "content": {"application/json": {"schema": {}}}},
    400: {"description": "the job failed (its result), or the request cannot run (an error)",
          "content": {"application/json": {"schema": {"type": "object", "required": ["error"]}}}},
    408: error("the job did not complete in time; it goes on (header x-sandmill-job-id)"),
}
TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}
