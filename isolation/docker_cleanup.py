"""The end of a Docker job's container: kill, forced removal (retried), the work dir
and parent cgroup; and the backend's ``close``, which waits for removals still going
on. A mixin of ``DockerBackend`` (docker.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import threading
import time
from typing import TYPE_CHECKING

from docker.errors import NotFound

from . import docker_cgroup as cg
from .docker_job import Job, in_thread

if TYPE_CHECKING:
    from .docker_warm import DockerWarm

log = logging.getLogger("sandmill.isolation.docker")

# How long a run waits for its clean-up (kill + remove) before it returns or re-raises;
# the clean-up thread goes on (close() waits for it), retrying the removal this long.
CLEANUP_WAIT_S = 5.0
REMOVE_FOR_S = 120.0


class ContainerCleanup:
    """``_cleanup``/``_clean`` of one job's container and ``close``; the backend gives
    ``kill_api``, ``_kill`` and ``_cleanups`` (the threads still removing)."""

    _cleanups: set[threading.Thread]
    warm: DockerWarm | None

    def _cleanup(self, job: Job) -> None:
        """Kill (unless it exited), remove the container, close the socket, remove the
        work dir and parent cgroup. Never raises. A setup still in its thread is told to
        stop (``abandoned``); the container is removed by name if its id is not known
        yet, and 'no such container' counts as gone only once no setup is in flight."""
        with job.lock:
            begun = job.setup_begun
            job.abandoned = True
        if not job.exited:
            self._kill(job, None)
        deadline = time.monotonic() + REMOVE_FOR_S
        while True:
            settled = not begun or job.setup_done.is_set()
            if job.container_id is None and settled:
                break  # never created
            try:
                self.kill_api.remove_container(job.container_id or job.name, force=True, v=True)
                gone = True
            except NotFound:
                gone = True
            except Exception as e:  # slow or busy dockerd: retry; the work dir and cgroup must go too
                gone = False
                if time.monotonic() > deadline:
                    log.error("container %s not removed after %.0f s: %s", job.name, REMOVE_FOR_S, e)
                    break
            if gone and settled:
                break
            job.setup_done.wait(0.2)
            if gone:  # a create in flight may still make it: look again once setup ends
                continue
            time.sleep(0.2)
        if job.sock is not None:
            with contextlib.suppress(OSError):
                job.sock.close()
        if job.own_parent:
            cg.kill_all(cg.job_parent(job.job_id), timeout=1.0)
            cg.remove_parent(job.job_id)
        shutil.rmtree(job.workdir, ignore_errors=True)

    def close(self) -> None:
        """Stop the warm containers, then wait (a bounded time) for clean-ups still
        removing containers."""
        if self.warm is not None:
            self.warm.close()
        deadline = time.monotonic() + REMOVE_FOR_S
        for t in list(self._cleanups):
            t.join(max(0.0, deadline - time.monotonic()))

    async def _clean(self, job: Job) -> None:
        """Run ``_cleanup`` in its own thread and wait for it up to CLEANUP_WAIT_S, also
        when cancelled again meanwhile: the job is dead by then (its cgroup is killed
        first); a removal that dockerd is slow to do goes on in the thread."""
        done = threading.Event()

        def target() -> None:
            try:
                self._cleanup(job)
            finally:
                done.set()
                self._cleanups.discard(threading.current_thread())

        t = threading.Thread(target=target, name="sandmill-docker-cleanup", daemon=True)
        self._cleanups.add(t)
        t.start()
        waiter = in_thread(done.wait, CLEANUP_WAIT_S)
        while not waiter.done():
            try:
                await asyncio.shield(waiter)
            except asyncio.CancelledError:
                continue
