"""Languages: how a job becomes a RunSpec, and how an Outcome becomes a job result."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from sandmill.isolation import Limits, Outcome, RunSpec, Status

from sandmill.profiles import Profile

from sandmill.store.storable import MAX_RESULT_JSON_BYTES, decode_output, json_problem, storable_text

_INCLUDE = re.compile(rb"^# sandmill: include (\w+\.py)\n", re.M)


def template(name: str) -> bytes:
    """An in-sandbox program of worker/templates, with its ``# sandmill: include F`` lines
    replaced by F's text (one copy of the code the programs share, one file each to run)."""
    base = resources.files("sandmill.worker").joinpath("templates")
    return _INCLUDE.sub(lambda m: base.joinpath(m.group(1).decode()).read_bytes(),
                        base.joinpath(name).read_bytes())


_PY_WRAPPER = template("python_wrapper.py")
# `name="$1"` / `name="${2:-default}"`: how a bash script declares its parameters.
_BASH_PARAM = re.compile(r"""^\s*(?:local\s+|declare\s+)?([A-Za-z_]\w*)=["']?\$\{?(\d+)""", re.M)


@dataclass
class JobResult:
    """What the worker writes to completed_job."""

    status: str  # success | failure
    result: Any
    error: str | None


def bash_params(content: str) -> list[str]:
    """Parameter names of a bash script in positional order."""
    by_pos = {int(pos): name for name, pos in _BASH_PARAM.findall(content)}
    return [by_pos[k] for k in sorted(by_pos)]


def job_env(profile: Profile) -> dict[str, str]:
    """The job's whole environment: a fixed base, the allowed worker vars, the static env."""
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8",
           "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    for name in profile.env_allow:
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(profile.env)
    return env


def build_spec(job: dict[str, Any], profile: Profile, env: dict[str, str]) -> RunSpec:
    """The RunSpec for a python3 or bash job under the group's limits."""
    limits: Limits = profile.limits
    if job.get("timeout_s"):
        limits = limits.merged({"wall_s": float(job["timeout_s"])})
    args = job["args"] or {}
    lang = job["language"]
    content = job["content"]
    if lang == "python3":
        return RunSpec(
            argv=[profile.python, "-u", "wrapper.py"],
            env=env,
            files={"wrapper.py": _PY_WRAPPER, "main.py": content.encode(),
                   "args.json": json.dumps(args).encode()},
            collect=["result.json", "error.json"],
            limits=limits,
            warm="wrapper.py",  # the same for every job: may run in a warm interpreter
        )
    if lang == "bash":
        names = bash_params(content) or list(args)
        positional = [_bash_arg(args.get(n)) for n in names]
        return RunSpec(
            argv=[profile.bash, "main.sh", *positional],
            env=env,
            files={"main.sh": content.encode()},
            limits=limits,
        )
    raise ValueError(f"language {lang!r} cannot run in a sandbox")


def _bash_arg(v: Any) -> str:
    if v is None:
        return ""
    return v if isinstance(v, str) else json.dumps(v)


def interpret(job: dict[str, Any], outcome: Outcome, limits: Limits) -> JobResult:
    """Turn the sandbox Outcome into the job's status, result and error, all of it storable
    (store/storable.py): what the job wrote is hostile."""
    lang = job["language"]
    if lang == "python3":
        if outcome.status is Status.success and "result.json" in outcome.files:
            return _python_result(outcome.files["result.json"], limits)
        if outcome.status is Status.exit_nonzero and "error.json" in outcome.files:
            err = _loads(outcome.files["error.json"])
            if isinstance(err, dict):
                return failure(str(err.get("name", "Error")), str(err.get("message", "")),
                                str(err["stack"]) if err.get("stack") else None)
        if outcome.status is Status.success:
            return failure("ResultError", "the job ended without writing a result")
        return failure(_outcome_name(outcome), _outcome_message(outcome, limits))
    if lang == "bash":
        if outcome.status is Status.success:
            return JobResult("success", _last_line(outcome.stdout), None)
        return failure(_outcome_name(outcome), _outcome_message(outcome, limits))
    raise ValueError(lang)


_NOT_JSON = object()


def _loads(data: bytes) -> Any:
    """JSON the job wrote, or _NOT_JSON (not UTF-8, not JSON, nested too deep)."""
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return _NOT_JSON


def _python_result(data: bytes, limits: Limits) -> JobResult:
    if len(data) >= limits.output_bytes:  # collected up to the limit: cut short, not JSON
        return failure("ResultNotStorable", f"the result is larger than the output limit of"
                                            f" {limits.output_bytes} bytes")
    if len(data) > MAX_RESULT_JSON_BYTES:  # refused before it is parsed
        return failure("ResultNotStorable", f"the result is {len(data)} bytes as JSON, over the"
                                             f" {MAX_RESULT_JSON_BYTES} bytes a result may take")
    value = _loads(data)
    if value is _NOT_JSON:
        return failure("ResultError", "result.json is not valid JSON")
    return JobResult("success", value, None)  # what jsonb refuses: execute.storable_result


def _last_line(stdout: bytes) -> Any:
    """A bash job's result: its last stdout line, as JSON when it is storable JSON, else as
    text (NUL and undecodable bytes shown replaced)."""
    lines = decode_output(stdout).rstrip("\n").split("\n")
    last = lines[-1] if lines else ""
    value = _loads(last.encode())
    if value is _NOT_JSON or json_problem(value):
        return last
    return value


def _outcome_name(outcome: Outcome) -> str:
    return {
        Status.exit_nonzero: "ExitCode", Status.timeout: "Timeout", Status.cpu_limit: "CpuLimit",
        Status.memory_limit: "MemoryLimit", Status.output_limit: "OutputLimit",
        Status.signalled: "Signalled", Status.sandbox_error: "SandboxError",
    }.get(outcome.status, "Error")


def _outcome_message(outcome: Outcome, limits: Limits) -> str:
    msg = outcome.describe(limits)
    if outcome.status is Status.exit_nonzero:
        tail = decode_output(outcome.stderr[-4096:]).strip().splitlines()[-3:]
        if tail:
            msg += ": " + " | ".join(tail)
    return msg


def failure(name: str, message: str, stack: str | None = None) -> JobResult:
    """A failed job's result and error text, made storable (the job may have written them)."""
    name, message = storable_text(name), storable_text(message)
    err: dict[str, Any] = {"name": name, "message": message}
    if stack:
        err["stack"] = storable_text(stack)
    return JobResult("failure", {"error": err}, f"{name}: {message}")
