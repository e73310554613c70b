"""Prometheus metrics through ``prometheus_client``: one custom collector, fed per scrape
from the database (every server sees the same numbers, whichever one is scraped).

- Gauges, read per scrape: jobs waiting and running and the oldest due job's wait, per
  tag; workers alive, their subworkers and busy subworkers, per group; each live worker's
  occupancy (every ``occupancy*`` column the worker row has: ``window`` label) and the
  age of its last ping.
- Counters and histograms of jobs, derived from ``completed_job`` (the table is the
  record, so a server restart neither resets nor double counts them): jobs completed by
  group, language, backend and status; jobs started (completed after a start, plus those
  running now); job duration and queue wait (from due to start) histograms. The group
  and backend are those of the worker that ran the job (``worker_history``, migration
  0012: kept after the worker unregisters); ``none`` for a job that never ran.
  Completed jobs are folded into in-memory totals once they are ``FOLD_LAG_S`` old (a
  completion commits within that of its ``completed_at``, so none is missed), the
  younger ones are counted afresh per scrape: a scrape reads only the last minute's
  completions, plus the whole table once at the first scrape of a server process.
- Claim and completion statement latency (``sandmill_worker_statement_duration_seconds``,
  labels ``group`` and ``statement``): each DB worker times the statements it sends
  (worker/stmt_timing.py: ``claim``, ``complete``, ``complete_and_claim``,
  ``dedicated_claim``, ``dedicated_complete``; 0.25 ms .. 5 s buckets) and sends the
  bucket counts, cumulative since it started, with each ping (merged into
  ``worker.info``'s ``statement_latency``); summed here over the live workers of a group.
  Agent workers send none (their statements run on the server, behind an HTTP call).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any, Iterator

import asyncpg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from sandmill.store import dashboard, workers

# Histogram bounds (ms) for job duration and queue wait: 5 ms .. 5 min.
BOUNDS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 300000]
FOLD_LAG_S = 60.0    # completions older than this are folded into the totals for good
ALIVE_S = 60.0       # a worker that pinged within this is alive (as the API's counts say)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_FOREVER = dt.datetime(9999, 1, 1, tzinfo=dt.timezone.utc)
_OCCUPANCY = re.compile(r"^occupancy(?:_(\w+))?$")

Key = tuple[str, str, str, str]  # group, language, backend, status


@dataclass
class Agg:
    """Completed jobs of one label set: counts, histogram buckets (not cumulative), sums."""
    count: int = 0
    started: int = 0
    dur: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS_MS) + 1))
    dur_sum_ms: float = 0.0
    wait: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS_MS) + 1))
    wait_sum_ms: float = 0.0

    def add_row(self, r: dict[str, Any]) -> None:
        n = r["n"]
        self.count += n
        if r["dur_b"] is not None:
            self.started += n
            self.dur[r["dur_b"]] += n
            self.wait[r["wait_b"]] += n
        self.dur_sum_ms += r["dur_ms"]
        self.wait_sum_ms += r["wait_ms"]

    def merged(self, other: "Agg") -> "Agg":
        return Agg(self.count + other.count, self.started + other.started,
                   [a + b for a, b in zip(self.dur, other.dur)], self.dur_sum_ms + other.dur_sum_ms,
                   [a + b for a, b in zip(self.wait, other.wait)], self.wait_sum_ms + other.wait_sum_ms)


def _fold(rows: list[dict[str, Any]], into: dict[Key, Agg]) -> dict[Key, Agg]:
    for r in rows:
        key = (r["worker_group"], r["language"], r["backend"], r["status"])
        into.setdefault(key, Agg()).add_row(r)
    return into


class CompletedRollup:
    """Totals of the completed jobs older than FOLD_LAG_S (one per server process)."""

    def __init__(self) -> None:
        self.until: dt.datetime | None = None
        self.totals: dict[Key, Agg] = {}
        self._lock = asyncio.Lock()

    async def read(self, db: asyncpg.Pool) -> dict[Key, Agg]:
        """The totals up to now: folds what became old enough, counts the rest afresh."""
        async with self._lock:
            edge = await dashboard.db_now(db) - dt.timedelta(seconds=FOLD_LAG_S)
            since = self.until or _EPOCH
            if edge > since:
                _fold(await dashboard.fold_completed(db, since, edge, BOUNDS_MS), self.totals)
                self.until = edge
            recent = _fold(await dashboard.fold_completed(db, self.until or since, _FOREVER, BOUNDS_MS), {})
            out = dict(self.totals)
        for k, a in recent.items():
            out[k] = out[k].merged(a) if k in out else a
        return out


@dataclass
class Snapshot:
    """What one scrape read from the database."""
    queue: list[dict[str, Any]]
    workers: list[dict[str, Any]]
    completed: dict[Key, Agg]
    running: list[dict[str, Any]]


def rollup_of(state: Any) -> CompletedRollup:
    """The app's rollup (``app.state.metrics_rollup``), made at the first scrape."""
    if getattr(state, "metrics_rollup", None) is None:
        state.metrics_rollup = CompletedRollup()
    return state.metrics_rollup


async def read_snapshot(db: asyncpg.Pool, rollup: CompletedRollup) -> Snapshot:
    return Snapshot(queue=await dashboard.queue_by_tag(db),
                    workers=await workers.list_workers(db, ALIVE_S),
                    completed=await rollup.read(db),
                    running=await dashboard.running_started(db))


def _buckets(counts: list[int]) -> list[tuple[str, float]]:
    out, acc = [], 0
    for bound, n in zip([*(str(b / 1000) for b in BOUNDS_MS), "+Inf"], counts):
        acc += n
        out.append((bound, acc))
    return out


class SandmillCollector:
    """A prometheus_client collector over one Snapshot."""

    def __init__(self, snap: Snapshot):
        self.snap = snap

    def collect(self) -> Iterator[Metric]:
        yield from self._queue()
        yield from self._workers()
        yield from self._jobs()

    def _queue(self) -> Iterator[Metric]:
        waiting = GaugeMetricFamily("sandmill_queue_jobs_waiting",
                                    "Jobs in the queue not running (due or scheduled later), per tag.",
                                    labels=["tag"])
        running = GaugeMetricFamily("sandmill_queue_jobs_running", "Jobs running now, per tag.",
                                    labels=["tag"])
        oldest = GaugeMetricFamily("sandmill_queue_oldest_wait_seconds",
                                   "How long the oldest due waiting job of a tag has waited (0: none due).",
                                   labels=["tag"])
        for r in self.snap.queue:
            waiting.add_metric([r["tag"]], r["waiting"])
            running.add_metric([r["tag"]], r["running"])
            oldest.add_metric([r["tag"]], r["oldest_wait_s"])
        yield from (waiting, running, oldest)

    def _workers(self) -> Iterator[Metric]:
        alive = GaugeMetricFamily("sandmill_workers_alive",
                                  f"Worker processes that pinged within {ALIVE_S:.0f} s, per group.",
                                  labels=["group"])
        slots = GaugeMetricFamily("sandmill_worker_subworkers", "Subworkers (job slots) of the live workers, per group.",
                                  labels=["group"])
        busy = GaugeMetricFamily("sandmill_worker_busy_subworkers",
                                 "Subworkers busy at the live workers' last ping, per group.", labels=["group"])
        occ = GaugeMetricFamily("sandmill_worker_occupancy_ratio",
                                "Share of a worker's slot time spent in jobs, over the window its row names"
                                " ('ping': since its previous ping).", labels=["worker", "group", "window"])
        age = GaugeMetricFamily("sandmill_worker_last_ping_age_seconds", "Seconds since a worker's last ping.",
                                labels=["worker", "group"])
        groups: dict[str, list[dict[str, Any]]] = {}
        for w in self.snap.workers:
            groups.setdefault(w["worker_group"], []).append(w)
            for col, v in w.items():
                m = _OCCUPANCY.match(col)
                if m and isinstance(v, (int, float)):
                    occ.add_metric([w["name"], w["worker_group"], m.group(1) or "ping"], float(v))
            age.add_metric([w["name"], w["worker_group"]], w["last_ping_s_ago"])
        for g, ws in sorted(groups.items()):
            alive.add_metric([g], len(ws))
            slots.add_metric([g], sum(w["subworkers"] for w in ws))
            busy.add_metric([g], sum(w["busy"] for w in ws))
        yield from (alive, slots, busy, occ, age)
        yield from _statement_latency(self.snap.workers)

    def _jobs(self) -> Iterator[Metric]:
        labels = ["group", "language", "backend"]
        started = CounterMetricFamily("sandmill_jobs_started", "Jobs started (completed after a start, or running).",
                                      labels=labels)
        completed = CounterMetricFamily("sandmill_jobs_completed", "Jobs completed, by status.",
                                        labels=[*labels, "status"])
        dur = HistogramMetricFamily("sandmill_job_duration_seconds", "Run time of completed jobs that started.",
                                    labels=[*labels, "status"])
        wait = HistogramMetricFamily("sandmill_job_queue_wait_seconds",
                                     "From a job's due time to its start, for completed jobs that started.",
                                     labels=labels)
        starts: dict[tuple[str, str, str], int] = {}
        waits: dict[tuple[str, str, str], Agg] = {}
        for (g, lang, b, status), a in sorted(self.snap.completed.items()):
            completed.add_metric([g, lang, b, status], a.count)
            starts[(g, lang, b)] = starts.get((g, lang, b), 0) + a.started
            if a.started:
                dur.add_metric([g, lang, b, status], _buckets(a.dur), a.dur_sum_ms / 1000)
                w = waits.setdefault((g, lang, b), Agg())
                waits[(g, lang, b)] = w.merged(a)
        for r in self.snap.running:
            k = (r["worker_group"], r["language"], r["backend"])
            starts[k] = starts.get(k, 0) + r["n"]
        for k, n in sorted(starts.items()):
            started.add_metric(list(k), n)
        for k, a in sorted(waits.items()):
            wait.add_metric(list(k), _buckets(a.wait), a.wait_sum_ms / 1000)
        yield from (started, completed, dur, wait)


def _statement_latency(rows: list[dict[str, Any]]) -> Iterator[Metric]:
    """Claim and completion statement latency, as the live workers report it in their
    ping (``info.statement_latency``: {statement: {"bounds_ms": [...], "counts": [...],
    "sum_ms": s}}, counts cumulative since the worker started), summed per group."""
    fam = HistogramMetricFamily("sandmill_worker_statement_duration_seconds",
                                "Claim and completion statements, timed by the workers that sent them.",
                                labels=["group", "statement"])
    total: dict[tuple[str, str], tuple[list[float], list[int], float]] = {}
    for w in rows:
        rep = (w.get("info") or {}).get("statement_latency")
        if not isinstance(rep, dict):
            continue
        for stmt, h in rep.items():
            try:
                bounds, counts, s = [float(b) for b in h["bounds_ms"]], [int(c) for c in h["counts"]], float(h["sum_ms"])
            except (KeyError, TypeError, ValueError):
                continue  # a worker's report is not trusted to be well formed
            if len(counts) != len(bounds) + 1:
                continue
            key = (w["worker_group"], str(stmt))
            old = total.get(key)
            if old is None:
                total[key] = (bounds, counts, s)
            elif old[0] == bounds:
                total[key] = (bounds, [a + b for a, b in zip(old[1], counts)], old[2] + s)
    for (g, stmt), (bounds, counts, s) in sorted(total.items()):
        acc, buckets = 0, []
        for le, n in zip([*(str(b / 1000) for b in bounds), "+Inf"], counts):
            acc += n
            buckets.append((le, acc))
        fam.add_metric([g, stmt], buckets, s / 1000)
    if total:
        yield fam


async def render(state: Any, db: asyncpg.Pool) -> bytes:
    """The Prometheus text exposition of sandmill's metrics, read from the database now."""
    snap = await read_snapshot(db, rollup_of(state))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SandmillCollector(snap))
    return generate_latest(registry)
