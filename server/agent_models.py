"""The agent routes' request bodies (pydantic, for their checks and the OpenAPI document),
and the fast reading of a completion batch: the one body whose size grows with the jobs
(a model validated per job cost the server a quarter of its time per job), read with
plain type checks, and through its model only when those fail (for the 422's detail)."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from sandmill.store import queue
from sandmill.store.wirejson import loads

from .models import GROUP_RE, _Storable

MAX_WAIT_S = 60.0
INT4 = 2**31 - 1


class AgentTokenCreate(_Storable):
    model_config = ConfigDict(extra="ignore")

    worker_group: str = Field(min_length=1, max_length=100, pattern=GROUP_RE.pattern)
    tags: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(min_length=1, max_length=100)
    exp: int = Field(description="when the token expires, unix seconds", gt=0, lt=2**40)


class AgentTokenRevoke(BaseModel):
    token: str = Field(min_length=1, max_length=10000)


class Named(_Storable):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=2, max_length=200)


class Register(Named):
    group: str = Field(min_length=1, max_length=100)
    tags: list[str] = Field(max_length=100)
    hostname: str = Field("", max_length=200)
    backend: str = Field("native", max_length=50)
    subworkers: int = Field(1, ge=1, le=10000)
    info: dict[str, Any] = Field(default_factory=dict)


class Ping(Named):
    jobs_done: int = Field(0, ge=0, le=2**62)
    busy: int = Field(0, ge=0, le=INT4)
    occupancy: float = Field(0.0, ge=0, le=1)


class Stats(BaseModel):
    """A worker's heartbeat figures (its ping rides on its long poll)."""
    jobs_done: int = Field(0, ge=0, le=2**62)
    busy: int = Field(0, ge=0, le=INT4)
    occupancy: float = Field(0.0, ge=0, le=1)


class Listen(Named):
    cursor: list[int] | None = Field(None, max_length=2)
    wait_s: float = Field(25.0, ge=0, le=MAX_WAIT_S)
    stats: Stats | None = None


class Pull(Named):
    n: int = Field(1, ge=0, le=1000)
    ahead: int = Field(0, ge=0, le=1000)
    ahead_after_s: float = Field(0.0, ge=0, le=3600)
    wait_s: float = Field(0.0, ge=0, le=MAX_WAIT_S)


class Done(BaseModel):  # a job's bytes: the database's handler answers 400 for what it cannot hold
    model_config = ConfigDict(extra="ignore")

    id: uuid.UUID
    status: Literal["success", "failure", "canceled"]
    result: Any = None
    error: str | None = None
    duration_ms: int = Field(0, ge=0, le=INT4)
    cpu_ms: int = Field(0, ge=0, le=INT4)
    mem_peak_kb: int = Field(0, ge=0, le=INT4)
    outcome: dict[str, Any] | None = None
    started_at: AwareDatetime | None = None

    def completion(self, worker: str) -> queue.Completion:
        return queue.Completion(self.id, worker, self.status, self.result, self.error,
                                self.duration_ms, self.cpu_ms, self.mem_peak_kb, self.outcome,
                                self.started_at)


class Complete(Named):
    done: list[Done] = Field(default_factory=list, max_length=1000)
    want: int = Field(0, ge=0, le=1000)
    ahead: int = Field(0, ge=0, le=1000)
    ahead_after_s: float = Field(0.0, ge=0, le=3600)
    starting: list[tuple[uuid.UUID, AwareDatetime]] = Field(default_factory=list, max_length=1000)


class Result(Named, Done):
    id: uuid.UUID | None = None  # the path's


class JobRef(Named):
    job_id: uuid.UUID


class Logs(JobRef):
    chunks: list[str] = Field(max_length=10000)


class AdminJob(Named):
    kind: Literal["init", "periodic"]
    content: str = Field(max_length=1_000_000)
    started_at: AwareDatetime
    status: Literal["success", "failure"]
    result: Any = None
    error: str | None = None
    logs: str = ""
    duration_ms: int = Field(0, ge=0, le=INT4)
    cpu_ms: int = Field(0, ge=0, le=INT4)
    mem_peak_kb: int = Field(0, ge=0, le=INT4)
    outcome: dict[str, Any] | None = None


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as the JSON body of a route that reads its body
    itself (its $defs inlined: the document has no components of theirs)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(v: Any) -> Any:
        if isinstance(v, dict):
            ref = v.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref[len("#/$defs/"):]])
            return {k: inline(x) for k, x in v.items()}
        return [inline(x) for x in v] if isinstance(v, list) else v

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


_STATUSES = frozenset({"success", "failure", "canceled"})


def _count(v: Any, hi: int = INT4) -> int:
    if type(v) is not int or not 0 <= v <= hi:
        raise ValueError(v)
    return v


# A job id as the agent writes it (str(uuid)): kept as text, which asyncpg sends as a uuid
# itself (in C), and compared as text with the statuses; uuid.UUID() in Python cost 1.5 µs,
# twice per job (its completion, its start stamp): 7% of the server's CPU per job. Any
# other spelling (upper case, braces) goes through the model, which reads it as a UUID.
_UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _id(v: Any) -> str:
    if type(v) is not str or _UUID_TEXT.fullmatch(v) is None:
        raise ValueError(v)
    return v


def _when(v: Any) -> dt.datetime | None:
    if v is None:
        return None
    t = dt.datetime.fromisoformat(v)
    if t.tzinfo is None:
        raise ValueError(v)
    return t


def _fast(raw: bytes) -> tuple[str, list[dict[str, Any]], Complete]:
    b = loads(raw)
    name = b["name"]
    if type(name) is not str or not 2 <= len(name) <= 200:
        raise ValueError(name)
    done = b.get("done", [])
    starting = b.get("starting", [])
    if type(done) is not list or len(done) > 1000 or type(starting) is not list or len(starting) > 1000:
        raise ValueError("lists")
    after = b.get("ahead_after_s", 0.0)
    if type(after) not in (int, float) or not 0 <= after <= 3600:
        raise ValueError(after)
    body = Complete.model_construct(
        name=name, done=[], want=_count(b.get("want", 0), 1000), ahead=_count(b.get("ahead", 0), 1000),
        ahead_after_s=float(after), starting=[(_id(i), _when(at)) for i, at in starting])
    if any(at is None for _, at in body.starting):
        raise ValueError("starting")
    return name, done, body


def completions(raw: bytes, worker: str | None = None) -> tuple[Complete, list[queue.Completion]]:
    """A completion batch's body, and its completions for the name it gives (every field
    checked; a 422 naming the bad ones, as the model says, when one is not as it should be).
    Job ids are text (canonical, lower case) when read fast, UUIDs when read by the model:
    ``str()`` of either is the same text."""
    try:
        name, done, body = _fast(raw)
        out = []
        for d in done:
            st, err, outcome = d["status"], d.get("error"), d.get("outcome")
            if st not in _STATUSES or (err is not None and type(err) is not str) or (
                    outcome is not None and type(outcome) is not dict):
                raise ValueError(d)
            out.append(queue.Completion(
                _id(d["id"]), name, st, d.get("result"), err, _count(d.get("duration_ms", 0)),
                _count(d.get("cpu_ms", 0)), _count(d.get("mem_peak_kb", 0)), outcome, _when(d.get("started_at"))))
        return body, out
    except Exception:  # noqa: BLE001 - the model says what is wrong, field by field
        try:
            body = Complete.model_validate_json(raw)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        return body, [d.completion(body.name) for d in body.done]
