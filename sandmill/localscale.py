"""The ``local`` autoscaling integration, in `sandmill up`: the supervisor starts and
stops a group's worker processes to match the count the server's autoscaler records in
the database (``autoscale_group.desired``, read every ``SANDMILL_UP_SCALE_POLL_S``, 1 s).

Scale-in stops an idle worker first (none of its jobs running or held), with SIGTERM: the
worker takes no new job, finishes those in hand within its grace (SANDMILL_GRACE_S) or
hands them back, and leaves, so nothing is lost."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import asyncpg

from sandmill.profiles import Profile
from sandmill.store import autoscale as store
from sandmill.store import db as dbmod

log = logging.getLogger("sandmill.up")

_PID_IN_NAME = re.compile(r"-(\d+)-[0-9a-f]{4}$")  # worker names end in -<pid>-<4 hex>


def poll_s() -> float:
    return float(os.environ.get("SANDMILL_UP_SCALE_POLL_S", 1.0))


@dataclass
class GroupScaler:
    """The worker processes of one autoscaled group. ``make_child(i)`` makes the i-th
    (an object with ``start(env)``, ``proc`` and ``name``, the supervisor's Child)."""

    profile: Profile
    make_child: Callable[[int], object]
    children: list = field(default_factory=list)  # serving
    stopping: list = field(default_factory=list)  # SIGTERMed, finishing their jobs
    made: int = 0

    @property
    def name(self) -> str:
        return self.profile.name

    def initial(self, desired: int | None) -> int:
        """How many to start with: the count last asked for, else min_workers."""
        a = self.profile.autoscaling
        return desired if desired is not None else (a.min_workers if a else 0)

    def converge(self, desired: int, running_by_pid: dict[int, int], env: dict[str, str]) -> None:
        """Start or stop processes until ``desired`` serve. ``running_by_pid``: the jobs
        each registered worker process runs or holds (a pid not in it has not registered
        yet: it is starting and has none)."""
        while len(self.children) < desired:
            c = self.make_child(self.made)
            self.made += 1
            c.start(env)
            self.children.append(c)
            log.info("autoscale %s: started %s (pid %d), %d serving", self.name, c.name, c.proc.pid,
                     len(self.children))
        while len(self.children) > desired:
            # idle first (no job running or held), then the newest
            order = sorted(range(len(self.children)), key=lambda i: (
                running_by_pid.get(self._pid(self.children[i]), 0), -i))
            c = self.children.pop(order[0])
            if c.proc is not None and c.proc.poll() is None:
                c.proc.send_signal(signal.SIGTERM)
                self.stopping.append(c)
            log.info("autoscale %s: stopping %s (%d job(s) in hand), %d serving", self.name, c.name,
                     running_by_pid.get(self._pid(c), 0), len(self.children))

    def reap(self) -> None:
        """Forget the stopped processes that have exited."""
        self.stopping = [c for c in self.stopping if c.proc is not None and c.proc.poll() is None]

    @staticmethod
    def _pid(c: object) -> int:
        p = getattr(c, "proc", None)
        return p.pid if p is not None else -1

    def procs(self) -> list[subprocess.Popen]:
        return [c.proc for c in self.children + self.stopping if c.proc is not None]


class DesiredPoll:
    """The supervisor's reads of the database (it is synchronous): the counts asked for
    and the jobs in hand of each group's workers, on one connection, reopened after a
    failure."""

    def __init__(self, url: str, groups: list[str]):
        self.url = url
        self.groups = groups
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection | None = None
        self.last = 0.0

    def due(self) -> bool:
        return time.monotonic() - self.last >= poll_s()

    def read(self) -> tuple[dict[str, int], dict[str, dict[int, int]]] | None:
        """(desired count by group, {pid: jobs in hand} by group), or None when the
        database cannot be read now (logged; the processes stay as they are)."""
        self.last = time.monotonic()
        try:
            return self.loop.run_until_complete(self._read())
        except Exception as e:  # noqa: BLE001 - the supervisor outlives the database
            log.warning("autoscale: cannot read the counts asked for: %s", e)
            if self.conn is not None:
                self.loop.run_until_complete(self.conn.close(timeout=2))
                self.conn = None
            return None

    async def _read(self) -> tuple[dict[str, int], dict[str, dict[int, int]]]:
        if self.conn is None or self.conn.is_closed():
            self.conn = await dbmod.connect(self.url)
        desired = await store.desired_counts(self.conn, self.groups)
        running: dict[str, dict[int, int]] = {}
        for g in self.groups:
            by_name = await store.running_per_worker(self.conn, g)
            running[g] = {int(m.group(1)): n for name, n in by_name.items()
                          if (m := _PID_IN_NAME.search(name))}
        return desired, running

    def close(self) -> None:
        try:
            if self.conn is not None:
                self.loop.run_until_complete(self.conn.close(timeout=2))
        except Exception:  # noqa: BLE001 - closing at exit
            pass
        self.loop.close()
