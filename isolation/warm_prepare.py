"""The next warm job's set-up while a job runs (``Backend.prepare`` on process and nsjail).

A lane (the task that runs jobs one after another: a worker's slot) that knows its next
job hands its spec over while the job before it runs. Once that job's J has gone, its
zygote has forked the next job process; the set-up made then, off the path from one
job's end to the next one's start: the job process's W checked (its pidfd, mount
namespace and cgroup), the job cgroup's limits written, the work dir made, the request
built. The run that follows (``run_warm`` with ``prepared``) only sends J. The zygote is
kept for it (``WarmPool.reserved``: not handed to another lane when the job before ends).

Nothing of the job runs before its own run: the job process holds no job data until J.
Its work dir exists while the job before runs, under the zygote's jobs dir, which that
job's process has covered with its own dir before any of its code ran (zygote.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import workdir
from .base import Prepared
from .cgroups import CgroupUnavailable, JobCgroup
from .spec import RunSpec
from .warm_proto import JobProc, JobRequest, WarmError
from .warm_zygote import Zygote

if TYPE_CHECKING:
    from .warm_pool import WarmPool

__all__ = ["Ready", "WarmPrepared", "job_started", "lane_done"]

log = logging.getLogger(__name__)

# (the zygote, the job's work dir) -> the job's request
RequestBuilder = Callable[[Zygote, Path], JobRequest]


@dataclass
class Ready:
    """A prepared job, taken by its run: the zygote (kept for it) and what was made."""

    z: Zygote
    wd: Path
    cgroup: JobCgroup
    req: JobRequest


class WarmPrepared(Prepared):
    """One job's warm set-up, made on the zygote its lane's running job hands on."""

    def __init__(self, pool: WarmPool, spec: RunSpec, lane: object, script: str | None,
                 program: str, build: RequestBuilder) -> None:
        self.pool = pool
        self.spec = spec
        self.lane = lane
        self.script = script  # the runtime script it runs in-process; None: an exec
        self.program = program
        self.build = build
        self.z: Zygote | None = None
        self.task: asyncio.Future[None] | None = None
        self.jp: JobProc | None = None
        self.wd: Path | None = None
        self.req: JobRequest | None = None
        self.over = False  # taken or discarded

    def start(self) -> None:
        """Bind to the lane's running zygote now, or when the lane's next J goes."""
        z = self.pool.lanes.get(self.lane)
        if z is not None:
            self._bind(z)
            return
        old = self.pool.waiting.pop(self.lane, None)
        if old is not None:
            old.discard()
        self.pool.waiting[self.lane] = self

    def fits(self, z: Zygote) -> bool:
        """``z`` serves this job's kind (run_warm checks its key exactly)."""
        if z.broken or z in self.pool.reserved:
            return False
        if self.script is None:
            return z.key[1] == b""  # an exec zygote (a pool key is (interpreter, script source))
        return z.key == (self.program, self.spec.files[self.script])

    def _bind(self, z: Zygote) -> None:
        if self.over or not self.fits(z):
            return
        self.z = z
        self.pool.reserved[z] = self
        self.task = asyncio.ensure_future(self._work(z))
        self.task.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _work(self, z: Zygote) -> None:
        """The set-up, while the job before runs (its J has gone)."""
        limits = self.spec.limits
        try:
            # first what needs no job process: its W may come after the job before ends
            self.wd = workdir.create(z.dir, self.spec.files, self.pool.uid, self.pool.gid)
            self.req = self.build(z, self.wd)
            jp = await z.forked_ahead()
            await asyncio.shield(jp.check())
            if z.ahead is not jp or z.broken:
                return
            jp.cgroup.set_limits(limits.memory_bytes, limits.pids, limits.cpu_cores)
            self.jp = jp
        except (WarmError, OSError, CgroupUnavailable, workdir.BadSpec) as e:
            # the run sets it up the normal way (and meets the same failure there)
            log.debug("a warm job's set-up ahead failed: %s", e)

    async def take(self, spec: RunSpec, key: tuple[str, bytes]) -> Ready | None:
        """(The run of the zygote ``key``.) What was made, once made; None when nothing
        fits (the run then
        sets up the normal way: this set-up is discarded)."""
        if self.over:
            return None
        if spec is not self.spec:  # made for another job
            self.discard()
            return None
        z = self.z
        try:
            if z is not None and self.task is not None and not z.broken:
                await asyncio.shield(self.task)
        except BaseException:
            self.discard()
            raise
        if (z is None or self.jp is None or self.wd is None or self.req is None or z.broken
                or z.key != key or z.ahead is not self.jp or self.pool.lanes.get(self.lane) is z):
            self.discard()
            return None
        self.over = True
        self.pool.reserved.pop(z, None)
        return Ready(z, self.wd, self.jp.cgroup, self.req)

    def discard(self) -> None:
        """Free it: the work dir goes, the zygote is free for any lane."""
        if self.over:
            return
        self.over = True
        if self.pool.waiting.get(self.lane) is self:
            del self.pool.waiting[self.lane]
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.wd is not None:
            workdir.remove(self.wd)
            self.wd = None
        z = self.z
        if z is not None and self.pool.reserved.get(z) is self:
            del self.pool.reserved[z]
            if z not in self.pool.lanes.values():  # not running a job: back to the idle ones
                self.pool.release(z)


def job_started(pool: WarmPool, lane: object, z: Zygote) -> None:
    """(run_warm, once J has gone.) ``z`` runs ``lane``'s job: a set-up that waits for
    it starts on it."""
    pool.lanes[lane] = z
    p = pool.waiting.pop(lane, None)
    if p is not None:
        p._bind(z)


def lane_done(pool: WarmPool, lane: object, z: Zygote) -> None:
    """(run_warm, its end, before ``z`` is released.) ``lane``'s job on ``z`` is over."""
    if pool.lanes.get(lane) is z:
        del pool.lanes[lane]
