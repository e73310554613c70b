"""A worker's python3 jobs with dependencies: the dependency job that resolves a script
version's lock, and the jobs that run with its environment mounted read-only.

- A **dependency job** (kind 'dependency', queued by ``scripts/create``) resolves the
  script version's requirements into a lock, records it on the script (ready, or failed
  with the resolver's message), installs its environment, and completes with the lock as
  its result; its logs are the resolver's and installer's output.
- A **script job** uses its version's recorded lock. If none is recorded yet (the job was
  claimed before its dependency job ran), the worker resolves it itself, through the same
  on-disk cache and flock (so it waits for a resolution in progress on this host), and
  records it: the first record wins, and every job of the version uses that one. A failed
  lock fails the job with the resolver's message.
- A **preview** resolves its requirements itself (cached on the host for a while).

The job then runs with the environment bound read-only at its own path (``Mount``) and on
its ``sys.path`` (``PYTHONPATH`` for a fresh interpreter; ``SANDMILL_PYDEPS`` for the
wrapper, which inserts it in a warm one). The worker holds the env's shared flock while
the job runs, so no worker evicts it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from typing import Any, Awaitable, Callable

from sandmill.isolation import Mount, RunSpec
from sandmill.store import pydeps as store
from sandmill.store.requirements import RequirementsError, requirements_of, requirements_text

from . import tools
from .envcache import EnvCache, Held

log = logging.getLogger("sandmill.worker")

ENV_VAR = "SANDMILL_PYDEPS"  # the wrapper puts this directory first on sys.path


class DepsFailed(Exception):
    """The job's requirements could not be resolved or installed: its error, as the job's."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


class PyDeps:
    """One per worker process: the env cache and what it knows of scripts' locks."""

    def __init__(self, cache: EnvCache | None = None):
        self._cache = cache
        self._reqs: OrderedDict[str, str | None] = OrderedDict()  # sha of content -> requirements
        self._locks: dict[tuple[str, str], str] = {}  # (workspace, hash) -> ready lock

    @property
    def cache(self) -> EnvCache:
        if self._cache is None:  # made at first use: a worker with no such job makes none
            self._cache = EnvCache()
        return self._cache

    def requirements(self, content: str) -> str | None:
        """The job's requirements (one a line), or None: it needs none. Cached by content,
        so a job of a known script costs one hash. Raises RequirementsError."""
        k = hashlib.sha1(content.encode(), usedforsecurity=False).hexdigest()
        if k in self._reqs:
            self._reqs.move_to_end(k)
            return self._reqs[k]
        reqs = requirements_text(requirements_of(content))
        self._reqs[k] = reqs
        if len(self._reqs) > 4096:
            self._reqs.popitem(last=False)
        return reqs

    def needs_env(self, job: dict[str, Any]) -> bool:
        """Whether this python3 job goes through here (has requirements, or resolves)."""
        if job["kind"] == store.DEPENDENCY_KIND:
            return True
        try:
            return self.requirements(job["content"]) is not None
        except RequirementsError:
            return True  # fails here, with the reason

    # ---- the lock ---------------------------------------------------------------------

    async def _resolve(self, reqs: str, target: tools.Target, note: Callable[[str], None]) -> str:
        note(f"resolving the requirements for Python {target.version} ({target.tag}): "
             + ", ".join(reqs.split()))
        try:
            lock, out, reused = await asyncio.to_thread(self.cache.resolve, reqs, target)
        except tools.ToolError as e:
            raise DepsFailed("DependencyResolutionFailed", str(e)) from None
        if out.strip():
            note(out.strip())
        note("resolved (this host's resolution from the last hour)" if reused else "resolved")
        return lock

    async def lock_for(self, pool: Any, job: dict[str, Any], target: tools.Target,
                       note: Callable[[str], None]) -> str:
        """The lock this job runs with (see the module's docstring); raises DepsFailed."""
        try:
            reqs = self.requirements(job["content"])
        except RequirementsError as e:
            raise DepsFailed("RequirementsError", str(e)) from None
        ws, h = job["workspace"], job["script_hash"]
        if h is None:  # a preview
            return await self._resolve(reqs or "", target, note)
        known = self._locks.get((ws, h))
        if known is not None:
            return known
        row = await store.script_lock(pool, ws, h)
        if row is None or row["lock_status"] is None:
            # a version stored before dependencies existed: resolve for this job only
            return await self._resolve(reqs or "", target, note)
        if row["lock_status"] == "pending":
            note(f"the lock of script version {h} is not resolved yet: resolving it here")
            try:
                lock, error = await self._resolve(row["requirements"] or reqs or "", target, note), None
            except DepsFailed as e:
                lock, error = None, f"{e.name}: {e}"
            if not await store.store_lock(pool, ws, h, lock, error):
                row = await store.script_lock(pool, ws, h)  # another resolution came first
            else:
                row = {"lock_status": "ready" if lock is not None else "failed", "lock": lock,
                       "lock_error": error}
        if row["lock_status"] == "failed":
            raise DepsFailed("DependencyResolutionFailed",
                             f"the requirements of script version {h} could not be resolved:"
                             f" {row['lock_error']}")
        self._locks[(ws, h)] = row["lock"]
        return row["lock"]

    # ---- the environment --------------------------------------------------------------

    async def hold(self, lock: str, target: tools.Target, note: Callable[[str], None]) -> Held:
        """The installed env of ``lock``, held until released; raises DepsFailed."""
        held = self.cache.try_hold(self.cache.key(lock, target))  # installed: no thread
        if held is not None:
            return held
        note("installing the environment (or waiting for another worker installing it)")
        fut = asyncio.get_running_loop().run_in_executor(None, self.cache.hold, lock, target)
        try:
            held = await asyncio.shield(fut)
        except tools.ToolError as e:
            raise DepsFailed("DependencyInstallFailed", str(e)) from None
        except asyncio.CancelledError:  # the job was killed while waiting: drop the hold later
            fut.add_done_callback(lambda f: f.exception() is None and f.result().release())
            raise
        note(f"installed {held.key}" if held.installed else f"environment {held.key} ready")
        return held

    async def run_job(self, pool: Any, job: dict[str, Any], target: tools.Target, spec: RunSpec,
                      run: Callable[[RunSpec], Awaitable[Any]], note: Callable[[str], None]) -> Any:
        """Run a python3 job with requirements: its env held, mounted and on its path."""
        lock = await self.lock_for(pool, job, target, note)
        held = await self.hold(lock, target, note)
        try:
            spec.mounts = [*spec.mounts, Mount(held.path, held.path)]
            spec.env = {**spec.env, ENV_VAR: held.path, "PYTHONPATH": held.path}
            return await run(spec)
        finally:
            held.release()

    async def dependency_job(self, pool: Any, job: dict[str, Any], target: tools.Target,
                             note: Callable[[str], None]) -> dict[str, Any]:
        """Resolve and record the script version's lock, install it; the job's result."""
        ws, h = job["workspace"], job["script_hash"]
        try:
            reqs = self.requirements(job["content"]) or ""
        except RequirementsError as e:
            raise DepsFailed("RequirementsError", str(e)) from None
        row = await store.script_lock(pool, ws, h)
        if row and row["lock_status"] == "ready":
            note("already resolved (by one of the script's jobs)")
            lock = row["lock"]
        else:
            try:
                lock = await self._resolve(reqs, target, note)
            except DepsFailed as e:
                await store.store_lock(pool, ws, h, None, f"{e.name}: {e}")
                raise
            if not await store.store_lock(pool, ws, h, lock, None):
                row = await store.script_lock(pool, ws, h)
                if row and row["lock_status"] == "failed":
                    raise DepsFailed("DependencyResolutionFailed", row["lock_error"] or "failed")
                lock = row["lock"] if row else lock
        self._locks[(ws, h)] = lock
        held = await self.hold(lock, target, note)  # installed now: the first job starts at once
        held.release()
        return {"requirements": reqs.split(), "lock": lock, "environment": held.key,
                "python": target.version}


_deps: PyDeps | None = None


def worker_deps() -> PyDeps:
    """This process's PyDeps (one worker per process)."""
    global _deps
    if _deps is None:
        _deps = PyDeps()
    return _deps
