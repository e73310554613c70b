"""The slot's next job set up in its backend while the slot's job runs
(``Backend.prepare``: on process and nsjail, the warm job's work dir, cgroup limits,
job process check and request; isolation/warm_prepare.py). The run that follows only
starts it. Nothing of the next job runs early; a set-up its job does not take is
discarded (the job went back, was canceled, the worker stops, the config changed)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sandmill.isolation import Backend, RunSpec
from sandmill.isolation.base import Prepared
from sandmill.profiles import Profile

if TYPE_CHECKING:
    from .execute import Executor
    from .feed import SlotState

log = logging.getLogger("sandmill.worker")


@dataclass
class Ahead:
    """One held job's set-up: its spec (the run must use this very object) and what the
    backend made for it, under the group's profile, env and backend of that moment."""

    job_id: uuid.UUID
    spec: RunSpec
    prepared: Prepared
    profile: Profile
    env: dict[str, str]
    backend: Backend

    def fits(self, job: dict[str, Any], profile: Profile, env: dict[str, str],
             backend: Backend | None) -> bool:
        """Made for ``job`` under the group as it is now (a config reload changes both)."""
        return (job["id"] == self.job_id and profile is self.profile and env is self.env
                and backend is self.backend)

    def discard(self) -> None:
        self.prepared.discard()


class NextSetUp:
    """The set-up of the slot's next job (its first held one), started while the slot's
    job runs: at once when that job is in hand, else when the claim that brings it is
    back. ``take`` hands it to the job's run, or discards it for another job."""

    def __init__(self, executor: Executor, st: SlotState, lane: asyncio.Task) -> None:
        self.executor = executor
        self.st = st
        self.lane = lane
        self.ahead: Ahead | None = None
        self.closed = False
        if st.ready:
            self._start(st.ready[0])
        elif st.coming:
            st.coming[0][0].add_done_callback(self._claimed)

    def _claimed(self, fut: asyncio.Future) -> None:
        st = self.st
        if self.closed or fut.cancelled() or fut.exception() is not None:
            return
        if st.ready:
            self._start(st.ready[0])
        elif st.coming and st.coming[0][0] is fut and (got := fut.result().ahead):
            self._start(got[0])  # (the slot moves it into its hands after its job)

    def _start(self, job: dict[str, Any]) -> None:
        try:
            self.ahead = self.executor.prepare(job, self.lane)
        except Exception:  # noqa: BLE001 - (a loop callback) the job runs the normal way
            log.exception("job %s: its set-up ahead failed", job["id"])

    def take(self, job: dict[str, Any]) -> Ahead | None:
        """The set-up for ``job``, if it is the one made (any other is discarded)."""
        self.closed = True
        a, self.ahead = self.ahead, None
        if a is not None and a.job_id != job["id"]:
            a.discard()
            return None
        return a

    def close(self) -> None:
        """Not run: what was made goes."""
        self.closed = True
        a, self.ahead = self.ahead, None
        if a is not None:
            a.discard()
