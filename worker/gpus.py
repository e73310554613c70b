"""GPU assignment: a GPU worker hands each running job its own GPU(s).

A group with ``gpus_per_job`` set gets a ``GpuPool`` over the host's GPUs
(``isolation.gpu.discover``: /dev/nvidia<N>, restricted by SANDMILL_GPUS). Each sandboxed
job takes ``gpus_per_job`` of them before it starts and gives them back when it ends,
however it ends. Without ``gpu_sharing`` a GPU serves one job at a time: a job that finds
too few free waits (first come, first served) rather than over-commit; with it, a job
takes the least busy GPUs and never waits. The job's ``RunSpec.gpu`` is the grant (its
nodes only), its env gets CUDA_VISIBLE_DEVICES (0..k-1: inside the sandbox its GPUs are
the only ones, so CUDA numbers them from 0) and NVIDIA_VISIBLE_DEVICES (the host
indexes), and its outcome the GPU figures (``Outcome.gpu``).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from sandmill.isolation import Backend, Outcome, OutputCallback, RunSpec
from sandmill.isolation.gpu import GpuHost, discover, job_env
from sandmill.isolation.gpu_measure import GpuMeter, nvml_readers
from sandmill.profiles import Profile

from .settings import WorkerStartError

log = logging.getLogger("sandmill.worker")


class GpuPool:
    """The GPUs of one worker and the jobs holding each."""

    def __init__(self, host: GpuHost, per_job: int, sharing: bool = False):
        self.host = host
        self.per_job = per_job
        self.sharing = sharing
        self.holders: dict[int, list[uuid.UUID]] = {i: [] for i in host.indexes}
        self._waiters: collections.deque[tuple[asyncio.Future, uuid.UUID]] = collections.deque()
        self.on_change: Callable[[], None] = lambda: None

    def _pick(self) -> list[int] | None:
        """The GPUs the next job gets now, or None when it must wait."""
        if self.sharing:
            return sorted(sorted(self.holders, key=lambda i: (len(self.holders[i]), i))[:self.per_job])
        free = [i for i in sorted(self.holders) if not self.holders[i]]
        return free[:self.per_job] if len(free) >= self.per_job else None

    def _assign(self, indexes: list[int], job_id: uuid.UUID) -> None:
        for i in indexes:
            self.holders[i].append(job_id)
        self.on_change()

    async def take(self, job_id: uuid.UUID) -> list[int]:
        """The GPUs for ``job_id``, waiting (in arrival order) until enough are free."""
        if not self._waiters and (got := self._pick()) is not None:
            self._assign(got, job_id)
            return got
        fut: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        self._waiters.append((fut, job_id))
        try:
            return await fut
        except asyncio.CancelledError:  # canceled while waiting: its place goes, or its GPUs
            if fut.done() and not fut.cancelled():
                self.release(job_id)
            else:
                self._waiters = collections.deque(w for w in self._waiters if w[0] is not fut)
                self._serve()
            raise

    def release(self, job_id: uuid.UUID) -> None:
        """Give back the GPUs of ``job_id`` and hand them to the jobs waiting."""
        for jobs in self.holders.values():
            if job_id in jobs:
                jobs.remove(job_id)
        self.on_change()
        self._serve()

    def _serve(self) -> None:
        while self._waiters:
            fut, job_id = self._waiters[0]
            if fut.done():
                self._waiters.popleft()
                continue
            got = self._pick()
            if got is None:
                return
            self._waiters.popleft()
            self._assign(got, job_id)
            fut.set_result(got)

    def state(self) -> list[dict[str, Any]]:
        """Each GPU and the jobs holding it, as the worker row shows it."""
        return [{"index": d.index, "name": d.name, "jobs": [str(j) for j in self.holders[d.index]]}
                for d in self.host.devices]

    def waiting(self) -> int:
        return sum(1 for f, _ in self._waiters if not f.done())


def gpu_pool(profile: Profile, info: dict[str, Any]) -> GpuPool | None:
    """The pool of a group with ``gpus_per_job`` (None for other groups, or where no GPU
    is found: its jobs then run without one). ``info["gpus"]`` becomes the GPUs it hands
    out. Raises WorkerStartError when a job could never get its GPUs here."""
    if profile.gpus_per_job is None:
        return None
    try:
        host = discover()
    except ValueError as e:  # a malformed SANDMILL_GPUS
        raise WorkerStartError(str(e)) from None
    for note in host.notes:
        log.warning("GPUs: %s", note)
    info["gpus"] = [d.name or f"nvidia{d.index}" for d in host.devices]
    if not host.devices:
        return None
    if len(host.devices) < profile.gpus_per_job:
        raise WorkerStartError(
            f"group {profile.name}: gpus_per_job is {profile.gpus_per_job} but this worker has"
            f" {len(host.devices)} GPU(s) ({', '.join(info['gpus'])}): no job could ever start")
    if not profile.gpu_sharing and profile.subworkers * profile.gpus_per_job > len(host.devices):
        log.warning("group %s: %d subworkers x %d GPU(s) per job > %d GPU(s): jobs past that wait"
                    " in this worker for a GPU", profile.name, profile.subworkers,
                    profile.gpus_per_job, len(host.devices))
    return GpuPool(host, profile.gpus_per_job, profile.gpu_sharing)


async def run_on_gpus(pool: GpuPool, backend: Backend, spec: RunSpec,
                      on_output: OutputCallback | None, job_id: uuid.UUID) -> Outcome:
    """Run ``spec`` with GPUs of ``pool``: wait for them, pass exactly them through, give
    them back however the run ends; the outcome gets their figures."""
    t_wait = time.monotonic()
    indexes = await pool.take(job_id)
    t0 = time.monotonic()
    try:
        grant = pool.host.grant(indexes)
        spec = dataclasses.replace(spec, gpu=grant, env={**spec.env, **job_env(grant)})
        readers, why = nvml_readers(indexes)
        meter = GpuMeter(readers, why)
        meter.start()
        try:
            out = await backend.run(spec, on_output)
        finally:
            figures = meter.stop()
        out.gpu = {"indexes": list(indexes), "shared": pool.sharing,
                   "wait_ms": int((t0 - t_wait) * 1000), "held_ms": int((time.monotonic() - t0) * 1000),
                   **figures}
        return out
    finally:
        pool.release(job_id)


class Publisher:
    """Writes the pool's state to the worker row when it changes: one write at a time,
    the latest state last (changes during a write are folded into the next)."""

    def __init__(self, pool: GpuPool, write: Callable[[list[dict[str, Any]]], Awaitable[None]],
                 spawn: Callable[[Any], None]):
        self.pool, self.write, self.spawn = pool, write, spawn
        self.dirty = False
        self.busy = False
        pool.on_change = self.changed

    def changed(self) -> None:
        self.dirty = True
        if not self.busy:
            self.busy = True
            self.spawn(self._run())

    async def _run(self) -> None:
        try:
            while self.dirty:
                self.dirty = False
                try:
                    await self.write(self.pool.state())
                except Exception as e:  # noqa: BLE001 - the next change or ping writes it again
                    log.warning("GPU state not written: %s", e)
                    return
        finally:
            self.busy = False
