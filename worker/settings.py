"""The worker's settings, the errors that stop it from starting, and what its parts read
from it live (``Group``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import asyncpg

    from sandmill.isolation import Backend
    from sandmill.profiles import Profile

    from .gpus import GpuPool


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


@dataclass
class WorkerSettings:
    """Timings of the worker; defaults suit production and tests alike. Each can be set
    from the environment (SANDMILL_JOB_PING_S, SANDMILL_WORKER_PING_S, SANDMILL_POLL_S,
    SANDMILL_GRACE_S...)."""

    # heartbeat of a running job (cancel is seen within this)
    job_ping_s: float = field(default_factory=lambda: _env_float("SANDMILL_JOB_PING_S", 1.0))
    # heartbeat of the worker row
    worker_ping_s: float = field(default_factory=lambda: _env_float("SANDMILL_WORKER_PING_S", 15.0))
    # fallback poll when no NOTIFY arrives
    poll_s: float = field(default_factory=lambda: _env_float("SANDMILL_POLL_S", 30.0))
    # on SIGTERM, how long the job in hand may still run before it is killed and re-queued
    grace_s: float = field(default_factory=lambda: _env_float("SANDMILL_GRACE_S", 30.0))
    # leftovers of dead workers (work dirs, job cgroups): swept at start and this often;
    # a dead worker's work dirs once untouched this long
    sweep_every_s: float = field(default_factory=lambda: _env_float("SANDMILL_SWEEP_EVERY_S", 600.0))
    sweep_grace_s: float = field(default_factory=lambda: _env_float("SANDMILL_SWEEP_GRACE_S", 60.0))
    # claim ahead (profile claim_ahead): a busy slot claims its next job while its current
    # one runs, only from a backlog (jobs due this long ago that no idle slot took), and
    # gives it back if the current job is still running after claim_ahead_hold_s
    claim_ahead_after_s: float = field(default_factory=lambda: _env_float("SANDMILL_CLAIM_AHEAD_AFTER_S", 0.02))
    claim_ahead_hold_s: float = field(default_factory=lambda: _env_float("SANDMILL_CLAIM_AHEAD_HOLD_S", 0.5))
    # when the worker's jobs are very short, a slot holds as many as run in this long (up
    # to claim_ahead_max), not one: it works on through its completion's round trip
    claim_ahead_cover_s: float = field(default_factory=lambda: _env_float("SANDMILL_CLAIM_AHEAD_COVER_S", 0.005))
    claim_ahead_max: int = field(default_factory=lambda: int(_env_float("SANDMILL_CLAIM_AHEAD_MAX", 8)))
    # how long the completion of a job whose slot already runs its next one may wait to
    # share a statement with others (their answers come back well before they are needed)
    completion_lazy_s: float = field(default_factory=lambda: _env_float("SANDMILL_COMPLETION_LAZY_S", 0.02))
    # at a burst's end (no job in hand, the queue's backlog gone), how long a slot's
    # completion may wait for those of the jobs still running: the last of them to end,
    # a result waiter or a new job sends it at once
    completion_tail_wait_s: float = field(default_factory=lambda: _env_float("SANDMILL_COMPLETION_TAIL_WAIT_S", 0.01))
    # start a requires_gpu group on a host where no GPU is found
    allow_no_gpu: bool = field(default_factory=lambda: os.environ.get("SANDMILL_ALLOW_NO_GPU", "") not in ("", "0"))


class WorkerStartError(Exception):
    """The worker cannot start (bad backend, no GPU...): exit code 2."""


class WorkerInitError(Exception):
    """The group's init script failed: exit code 3. ``logs`` is the script's output."""

    def __init__(self, message: str, logs: str):
        super().__init__(message)
        self.logs = logs


class Group(Protocol):
    """What the worker's parts read from it at each use, not once: a reload of the group's
    config changes the profile, tags and env while it runs; the pool and backend are set
    at start. ``Worker`` is the one implementation."""

    name: str
    tags: list[str]
    profile: Profile
    env: dict[str, str]
    backend: Backend | None
    pool: asyncpg.Pool | None
    gpus: GpuPool | None  # a GPU group's GPUs (worker/gpus.py), set at start
    # the store's functions: sandmill.store.queue, or an agent's over HTTP (worker/agent_store.py)
    q: Any
