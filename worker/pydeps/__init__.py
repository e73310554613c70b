"""Python scripts with dependencies: resolve a script's requirements into a lock once,
install each lock once into a content-addressed environment on the worker host, and run
the job with it mounted read-only on its ``sys.path``. See docs/architecture.md, "Python
dependencies".

- ``tools``: the resolver and installer (uv, pip as the fallback)
- ``envcache``: the environments on disk (flocks, install once, LRU eviction)
- ``runner``: the worker's side (dependency jobs, a job's lock and env)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sandmill.isolation import RunSpec

from ..runtimes import JobResult, failure
from .runner import DepsFailed, PyDeps, worker_deps
from .tools import target_of

__all__ = ["DepsFailed", "PyDeps", "run", "worker_deps"]


async def run(job: dict[str, Any], spec: RunSpec, group: Any, sink: Any,
              run_spec: Callable[[RunSpec], Awaitable[Any]]) -> Any:
    """A python3 job that needs the dependency machinery (``PyDeps.needs_env``): the
    dependency job's result, or the job's Outcome run with its environment by
    ``run_spec`` (the group's backend, on the job's GPUs in a GPU group); a failure
    JobResult with the resolver's or installer's message when that fails."""
    deps = worker_deps()
    target = target_of(group.profile.python)
    try:
        if job["kind"] == "dependency":
            return JobResult("success", await deps.dependency_job(group.pool, job, target, sink.note), None)
        return await deps.run_job(group.pool, job, target, spec,
                                  run_spec, sink.note)
    except DepsFailed as e:
        sink.note(f"{e.name}: {e}")
        return failure(e.name, str(e))
