"""The sections of `python -m bench` that call the feature benchmarks (bench/dedicated.py,
agent.py, autoscale.py, pydeps.py, dashboard.py) on the suite's PostgreSQL: each takes
(bp, counts, log) like the sections of bench/suite.py and returns plain data for the
tables and the report (bench/report_more.py). Each benchmark keeps its own command."""

from __future__ import annotations

import json

from . import agent as agent_bench
from . import autoscale as autoscale_bench
from . import dashboard as dashboard_bench
from . import dedicated as dedicated_bench
from . import pydeps as pydeps_bench
from .common import BenchPG
from .suite import Counts, available_backends


def dedicated(bp: BenchPG, counts: Counts, log=print) -> dict:
    """Per backend present: one dedicated worker beside one standard warm worker (no-op
    drain from the due instant, fib(10) run_wait_result p50/p99)."""
    probes = available_backends(counts.dedicated_backends)
    rows = []
    for backend, why in probes.items():
        if why:
            log(f"  {backend}: skipped ({why})")
            continue
        log(f"  {backend}: {counts.dedicated_jobs} no-op jobs, {counts.dedicated_runs} fib(10) runs per worker")
        r = dedicated_bench.run(counts.dedicated_jobs, counts.dedicated_runs, backend, 1, bp=bp)
        log("  " + dedicated_bench.report(r).replace("\n", "\n  "))
        rows.append(r)
    return {"rows": rows, "probes": probes}


def agent(bp: BenchPG, counts: Counts, log=print) -> dict:
    """One agent worker vs one DB worker (8 subworkers each, alternating rounds); then the
    server and the database with ``agent_idle_agents`` idle agents, beside the server alone."""
    log(f"  throughput: {counts.agent_jobs} no-op jobs x {counts.agent_rounds} round(s), DB worker and agent")
    tp = agent_bench.throughput(bp, counts.agent_jobs, counts.agent_rounds)
    log(f"  DB worker {tp['db_median']:.0f} jobs/s, agent {tp['agent_median']:.0f} jobs/s"
        f" ({100 * tp['agent_share']:.0f}%)")
    log(f"  idle: the server alone, then {counts.agent_idle_agents} agents, {counts.agent_idle_s:g} s each")
    base = agent_bench.idle(bp, 0, counts.agent_idle_s)
    il = agent_bench.idle(bp, counts.agent_idle_agents, counts.agent_idle_s)
    il["baseline"] = base
    log(f"  {il['agents']} agents: server CPU {100 * il['server_cpu_share']:.1f}% of a core,"
        f" {il['tx_per_s']:.2f} tx/s (alone: {100 * base['server_cpu_share']:.1f}%, {base['tx_per_s']:.2f} tx/s)")
    return {"throughput": tp, "idle": il}


def autoscale(bp: BenchPG, counts: Counts, log=print) -> dict:
    """The ramp idle -> burst -> idle on `sandmill up` (the chart is drawn by the report)."""
    quick = counts.autoscale_quick
    waves = autoscale_bench.burst_waves(quick)
    log(f"  burst of {sum(n for _, n, _ in waves)} sleep jobs in {len(waves)} wave(s)")
    res = autoscale_bench.run(quick, None, bp=bp)
    res["profile"] = json.loads(autoscale_bench.profile(quick))
    res["waves"] = waves
    res["env"] = {k: v for k, v in autoscale_bench.ENV.items() if k != "SANDMILL_ADMIN_TOKEN"}
    log(f"  first scale-out {res['time_to_first_scale_out_s'] or float('nan'):.2f} s after the burst,"
        f" queue wait p95 {res['queue_wait_p95_s']:.2f} s, back to zero {res['queue_empty_to_zero_s']:.1f} s"
        " after the queue emptied")
    return res


def pydeps(bp: BenchPG, counts: Counts, log=print) -> dict:
    """Per backend present: no deps, the first job of a new lock, later jobs."""
    probes = available_backends(counts.backends)
    rows = []
    for backend, why in probes.items():
        if why:
            log(f"  {backend}: skipped ({why})")
            continue
        locks = min(counts.pydeps_locks, len(pydeps_bench.PINS))
        log(f"  {backend}: {counts.pydeps_jobs} jobs per row, {locks} new lock(s)")
        r = pydeps_bench.run(backend, counts.pydeps_jobs, locks, bp=bp)
        log("  " + ", ".join(f"{k} p50 {v['ms']['median']:.1f} ms" for k, v in r["rows"].items()))
        rows.append(r)
    return {"rows": rows, "probes": probes, "jobs": counts.pydeps_jobs, "locks": counts.pydeps_locks}


def dashboard(bp: BenchPG, counts: Counts, log=print) -> dict:
    """The dashboard's page loads with ``dashboard_jobs`` completed jobs."""
    log(f"  {counts.dashboard_jobs:,} completed jobs, {counts.dashboard_rounds} rounds")
    res = dashboard_bench.run(counts.dashboard_jobs, counts.dashboard_rounds, bp=bp)
    log(f"  worst page p95 {res['worst_p95_ms']:.1f} ms; first /metrics scrape {res['first_scrape_ms']:.0f} ms")
    return res


SECTIONS = {"dedicated": dedicated, "agent": agent, "autoscale": autoscale, "pydeps": pydeps,
            "dashboard": dashboard}
