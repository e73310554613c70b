"""`sandmill up`: embedded PostgreSQL, the server and the worker groups as child processes.
A child that dies is started again; Ctrl-C or SIGTERM stops them all, and then removes
whatever job containers its workers left (a worker killed after the grace cannot)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sandmill.isolation import docker_sweep
from sandmill.profiles import load_profile, resolve
from sandmill.server.settings import admin_token
from sandmill.store import db as dbmod
from sandmill.store import embedded

from .agent_cli import tls_argv

from .localscale import DesiredPoll, GroupScaler

log = logging.getLogger("sandmill.up")

# How long stopping children get after SIGTERM before SIGKILL: a worker's own grace for
# its jobs (SANDMILL_GRACE_S, 30 s) and its clean-up fit in it.
STOP_GRACE_S = 40.0
# The server's application_name (workers name theirs: 'sandmill-worker GROUP').
SERVER_APP_NAME = "sandmill-server"


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)

    pids: list[int] = field(default_factory=list)  # every process it ran (restarts too)
    env: dict[str, str] = field(default_factory=dict)  # its own, over the shared env

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(self.argv, env={**env, **self.env})
        self.pids.append(self.proc.pid)
        self.started = time.monotonic()


def stop_children(procs: list[subprocess.Popen], grace_s: float = STOP_GRACE_S,
                  owner_pids: set[int] | None = None) -> list[str]:
    """SIGTERM every child, SIGKILL those still running after ``grace_s``; then remove
    the job containers of ``owner_pids`` (default: the children's pids) that are left,
    running or not. Returns the ids of the containers removed."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("pid %d still running %.0f s after SIGTERM: killing it", p.pid, grace_s)
            p.kill()
            p.wait()
    pids = owner_pids if owner_pids is not None else {p.pid for p in procs}
    # All of them are dead now: their containers are leftovers (docker_sweep checks that).
    removed = docker_sweep.sweep_stale(pids=pids)
    if removed:
        log.warning("removed %d job container(s) left by stopped workers", len(removed))
    return removed


def autoscaled_groups(profiles: list[str], py: list[str]) -> list[GroupScaler]:
    """The groups of ``profiles`` autoscaled by the ``local`` integration: their processes
    follow the server's autoscaler instead of a fixed count."""
    out = []
    for path in profiles:
        p = load_profile(path)
        a = p.autoscaling
        if a is not None and a.enabled and a.integration.type == "local":
            out.append(GroupScaler(p, lambda i, path=path, n=p.name: Child(
                f"{n}-auto-{i}", py + ["worker", "--profile", path])))
    return out


def run_up(args: argparse.Namespace) -> int:
    """Run everything until a signal; returns the exit code."""
    data_dir = Path(args.data_dir)
    url = args.database_url or os.environ.get("DATABASE_URL")
    pg = None
    if not url:
        log.info("starting embedded PostgreSQL in %s", data_dir / "pg")
        pg = embedded.start_embedded(data_dir, verbose=getattr(args, "verbose", False))
        url = embedded.embedded_url(pg)

    asyncio.run(dbmod.migrate_url(url))
    token = admin_token(data_dir)
    profiles = [str(resolve(p)) for p in (args.profile or ["default", "native"])]
    # the server's autoscaler learns the groups from these (SANDMILL_PROFILES)
    env = {**os.environ, "DATABASE_URL": url, "SANDMILL_ADMIN_TOKEN": token,
           "SANDMILL_PROFILES": os.pathsep.join(profiles)}
    py = [sys.executable, "-m", "sandmill"]
    children = [Child("server", py + ["server", "--data-dir", str(data_dir), "--host", args.host,
                                      "--port", str(args.port), *tls_argv(args)],
                     env={"PGAPPNAME": SERVER_APP_NAME})]  # its backends in pg_stat_activity
    scalers = autoscaled_groups(profiles, py)  # local autoscaling: counts from the database
    poll = DesiredPoll(url, [g.name for g in scalers]) if scalers else None
    for prof in profiles:
        if any(g.profile.name == load_profile(prof).name for g in scalers):
            continue
        count = args.workers if Path(prof).name == "default.yaml" else 1
        for i in range(count):
            children.append(Child(f"{Path(prof).stem}-{i}", py + ["worker", "--profile", prof]))

    stopping = False

    def _stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    for c in children:
        c.start(env)
    if poll is not None:
        got = poll.read()
        for g in scalers:
            g.converge(g.initial(got[0].get(g.name) if got else None), {}, env)
    print(f"sandmill is up: API on http://{args.host}:{args.port} (docs at /docs), "
          f"{len(children) - 1} worker process(es); Ctrl-C stops everything", file=sys.stderr)
    try:
        while not stopping:
            time.sleep(0.5)
            if poll is not None and poll.due() and (got := poll.read()) is not None:
                for g in scalers:
                    if g.name in got[0]:
                        g.converge(got[0][g.name], got[1].get(g.name, {}), env)
            for g in scalers:
                g.reap()
            for c in children + [c for g in scalers for c in g.children]:
                rc = c.proc.poll() if c.proc else 0
                if rc is None or stopping:
                    continue
                if rc == 2 and time.monotonic() - c.started < 5:
                    log.error("%s refused to start (exit 2); not restarting it", c.name)
                    c.proc = None
                    continue
                c.restarts += 1
                delay = min(30.0, 0.5 * 2 ** min(c.restarts, 6))
                log.warning("%s exited with %s; starting it again in %.1fs (restart %d)", c.name, rc, delay, c.restarts)
                time.sleep(delay)
                if not stopping:
                    c.start(env)
    finally:
        every = children + [c for g in scalers for c in g.children + g.stopping]
        log.info("stopping %d process(es)", len(every))
        stop_children([c.proc for c in every if c.proc],
                      owner_pids={pid for c in every for pid in c.pids})
        if poll is not None:
            poll.close()
        if pg is not None:
            pg.cleanup() if hasattr(pg, "cleanup") else None
    return 0
