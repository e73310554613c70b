"""Requests waiting for a job's result, woken by the completion NOTIFY (channel queue.CH_DONE)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any, Iterator


class ResultWaiters:
    """Per job id, the futures of the requests waiting for it to complete."""

    def __init__(self) -> None:
        self._by_job: dict[uuid.UUID, list[asyncio.Future]] = {}

    def on_done(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        """The asyncpg listener callback: the payload is the completed job's id."""
        for fut in self._by_job.pop(uuid.UUID(payload), []):
            if not fut.done():
                fut.set_result(True)

    @contextlib.contextmanager
    def register(self, job_id: uuid.UUID) -> Iterator[asyncio.Future]:
        """A future that resolves when ``job_id`` completes; unregistered on exit."""
        fut = asyncio.get_running_loop().create_future()
        self._by_job.setdefault(job_id, []).append(fut)
        try:
            yield fut
        finally:
            lst = self._by_job.get(job_id)
            if lst and fut in lst:
                lst.remove(fut)
                if not lst:
                    self._by_job.pop(job_id, None)
