"""Load with faults: jobs submitted over HTTP by concurrent clients while worker processes
are SIGKILLed and PostgreSQL restarts; every job must complete, each exactly once.

    python -m bench.faults [--jobs 10000] [--clients 50] [--kills 3] [--restarts 1]

A server and native worker processes (jobs that sleep ``--sleep-s``) run on an embedded
PostgreSQL of the run's own. The faults are spread over the submission: the k-th of n at
k/(n+1) of the jobs submitted. A killed worker is started again at once (as ``sandmill up``
would), so capacity stays; a restart is ``pg_ctl restart -m fast`` (the connections of
every process are cut). A client retries a 503 (the database is down) after 50 ms; the
latency of a submission is that of its accepted request, and the 503s are counted apart.
"""

from __future__ import annotations

import argparse
from collections import Counter
import asyncio
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field

import httpx

from sandmill.store import db as dbmod
from sandmill.store import embedded

from .common import NATIVE_PROFILE, BenchPG, count_done, pct, wait_registered

class FaultPG(BenchPG):
    """The run's embedded PostgreSQL, which it may stop, start and restart."""

    def _pg_ctl(self, *args: str) -> None:
        embedded.import_pgserver().pg_ctl(["-w", *args], pgdata=self.pg.pgdata,
                                          user=self.pg.system_user, timeout=60)

    def stop(self) -> None:
        """Stop PostgreSQL (fast: open transactions abort, every connection is cut)."""
        self._pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        """Start it again, with the options (socket dir) pgserver first started it with."""
        self.pg.ensure_postgres_running()

    def restart(self) -> None:
        self._pg_ctl("-l", str(self.pg.log), "-m", "fast", "restart")


@dataclass
class Run:
    """What a run saw."""

    jobs: int
    clients: int
    ids: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    unavailable: int = 0  # 503 answers (retried)
    other_errors: list[str] = field(default_factory=list)  # answers other than 201 and 503
    transport_errors: list[str] = field(default_factory=list)  # no answer at all (retried)
    faults: list[str] = field(default_factory=list)
    total_s: float = 0.0
    completions: dict[str, int] = field(default_factory=dict)  # job id -> completed_job rows
    statuses: dict[str, int] = field(default_factory=dict)
    workers_alive: bool = True

    @property
    def exactly_once(self) -> bool:
        return len(self.ids) == self.jobs and all(self.completions.get(i) == 1 for i in self.ids)


async def _client(http: httpx.AsyncClient, ws: str, tag: str, sleep_s: float, todo: list[int],
                  run: Run, submitted: asyncio.Event) -> None:
    while todo:
        todo.pop()
        while True:
            t0 = time.monotonic()
            try:
                r = await http.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                                    json={"language": "sleep", "content": "", "args": {"seconds": sleep_s}})
            except httpx.HTTPError as e:  # the connection closed with no answer: retried
                run.transport_errors.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.05)
                continue
            if r.status_code == 503 and "error" in r.json():
                run.unavailable += 1
                await asyncio.sleep(0.05)
                continue
            if r.status_code != 201:
                run.other_errors.append(f"{r.status_code}: {r.text[:200]}")
                await asyncio.sleep(0.05)
                continue
            run.latencies.append(time.monotonic() - t0)
            run.ids.append(r.text.strip().strip('"'))
            submitted.set()
            break


async def _faults(pg: FaultPG, cluster, workers: list[subprocess.Popen], start_worker, run: Run,
                  kills: int, restarts: int) -> None:
    """Inject the faults as the submissions pass their marks."""
    plan = ["kill"] * kills
    for _ in range(restarts):  # the restarts amid the kills
        plan.insert((len(plan) + 1) // 2, "restart")
    marks = [run.jobs * (k + 1) // (len(plan) + 1) for k in range(len(plan))]
    for fault, mark in zip(plan, marks):
        while len(run.ids) < mark:
            await asyncio.sleep(0.02)
        if fault == "kill":
            victim = workers.pop(0)
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            workers.append(start_worker())
            run.faults.append(f"SIGKILL worker pid {victim.pid} at {len(run.ids)} jobs submitted")
        else:
            t0 = time.monotonic()
            await asyncio.to_thread(pg.restart)
            run.faults.append(f"PostgreSQL restart at {len(run.ids)} jobs submitted"
                              f" (down about {time.monotonic() - t0:.1f} s)")


async def _wait_completed(url: str, ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            conn = await dbmod.connect(url)
            try:
                n = await count_done(conn, ids)
            finally:
                await conn.close()
            if n >= len(ids):
                return
        except Exception:  # noqa: BLE001 - the database may be restarting
            pass
        await asyncio.sleep(0.2)
    raise RuntimeError(f"not every job completed within {timeout_s:g} s")


def run_faults(jobs: int = 10_000, clients: int = 50, kills: int = 3, restarts: int = 1,
               processes: int = 4, subworkers: int = 8, sleep_s: float = 0.01,
               timeout_s: float = 600, pg: FaultPG | None = None) -> Run:
    """One run; see the module's doc. ``pg``: a FaultPG to use (else one of its own)."""
    own = pg is None
    pg = pg or FaultPG()
    run = Run(jobs, clients)
    try:
        url = pg.database("faults")
        tag = f"faults{uuid.uuid4().hex[:6]}"
        group, ws = f"g{tag}", f"ws{tag}"
        cluster = pg.cluster(url, "faults", env={"SANDMILL_PING_TIMEOUT_S": "3",
                                                 "SANDMILL_MONITOR_EVERY_S": "0.5"})
        text = NATIVE_PROFILE.format(name=group, tag=tag, subworkers=subworkers)
        try:
            cluster.start_server()
            workers = [cluster.start_worker(group, profile_text=text) for _ in range(processes)]
            asyncio.run(wait_registered(url, group, processes))

            async def go() -> None:
                todo = list(range(jobs))
                submitted = asyncio.Event()
                limits = httpx.Limits(max_connections=clients)
                async with cluster.async_client(limits=limits) as http:
                    t0 = time.monotonic()
                    faults = asyncio.create_task(_faults(
                        pg, cluster, workers, lambda: cluster.start_worker(group, profile_text=text),
                        run, kills, restarts))
                    await asyncio.gather(*(_client(http, ws, tag, sleep_s, todo, run, submitted)
                                           for _ in range(clients)))
                    await faults
                    await _wait_completed(url, run.ids, timeout_s)
                    run.total_s = time.monotonic() - t0

            asyncio.run(go())
            run.workers_alive = all(p.poll() is None for p in workers)
            if not run.workers_alive:
                print(cluster.logs())
            asyncio.run(_count(url, run))
        finally:
            cluster.stop()
    finally:
        if own:
            pg.close()
    return run


async def _count(url: str, run: Run) -> None:
    conn = await dbmod.connect(url)
    try:
        rows = await conn.fetch("SELECT id::text, count(*) AS n, min(status) AS status FROM completed_job"
                                " WHERE id = ANY($1::uuid[]) GROUP BY id", run.ids)
        run.completions = {r["id"]: r["n"] for r in rows}
        for r in rows:
            run.statuses[r["status"]] = run.statuses.get(r["status"], 0) + 1
    finally:
        await conn.close()


def table(run: Run) -> str:
    """The run as a table."""
    once = sum(1 for i in run.ids if run.completions.get(i) == 1)
    lines = [
        f"| jobs | {run.jobs:,} |",
        f"| clients | {run.clients} |",
        f"| total time | {run.total_s:.1f} s |",
        f"| submission latency p50 / p99 | {pct(run.latencies, 50) * 1000:.1f} / {pct(run.latencies, 99) * 1000:.1f} ms |",
        f"| 503 answers while the database was down (retried) | {run.unavailable} |",
        f"| completions per job | {once:,} of {len(run.ids):,} jobs completed exactly once"
        f" ({'ok' if run.exactly_once else 'FAILED'}) |",
        f"| statuses | {', '.join(f'{k} {v:,}' for k, v in sorted(run.statuses.items()))} |",
        f"| faults injected | {len(run.faults)}: {'; '.join(run.faults)} |",
    ]
    kinds = Counter(e.split(":", 1)[0] for e in run.transport_errors)
    lines.append(f"| requests closed with no answer (retried) | {len(run.transport_errors)}"
                 f"{': ' + ', '.join(f'{k} {v}' for k, v in kinds.most_common()) if kinds else ''} |")
    if run.other_errors:
        lines.append(f"| other answers (not 201 or 503) | {len(run.other_errors)}: {run.other_errors[:3]} |")
    return "| | |\n|---|---|\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--restarts", type=int, default=1)
    ap.add_argument("--processes", type=int, default=4, help="worker processes")
    ap.add_argument("--subworkers", type=int, default=8, help="slots per worker process")
    ap.add_argument("--sleep-s", type=float, default=0.01, help="each job sleeps this long")
    a = ap.parse_args(argv)
    run = run_faults(a.jobs, a.clients, a.kills, a.restarts, a.processes, a.subworkers, a.sleep_s)
    print(table(run))
    return 0 if run.exactly_once and not run.other_errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
