"""sandmill's benchmark set, on the machine at hand, in one command:

    python -m bench --out DIR [--quick] [--only overhead,scaling,queue,idle,recovery,
                                             dedicated,agent,autoscale,pydeps,dashboard]

1. per-job overhead, one worker, per backend present (process, nsjail, docker) and
   language (python3, bash), beside the bare interpreter start;
2. scaling: 10..100 native subworkers draining 2,000 jobs of 100 ms;
3. queue throughput: no-op jobs, sandmill vs pgqueuer's drain benchmark, same PostgreSQL;
4. idle load of a cluster (committed tx/s);
5. recovery: SIGKILL of a worker to its job running again;
6. dedicated: no-op drain and fib(10) latency, a dedicated worker beside a standard one;
7. agent: agent worker vs DB worker jobs/s; server CPU and tx/s with 200 idle agents;
8. autoscale: a ramp idle -> burst -> idle, workers vs queue depth;
9. pydeps: the first job of a new requirement lock, later jobs, no deps, per backend;
10. dashboard: page-load p95 with 100,000 completed jobs.

Prints tables and writes DIR/report.md, DIR/*.png and DIR/results.json. Everything runs
on one embedded PostgreSQL (pgserver) started for the run. --quick: tiny counts, the
process backend only (a smoke run of every section: about a minute for 1-5, about three
more for 6-10). Sections 6-10 are also commands of their own (python -m bench.dedicated,
bench.agent, bench.autoscale, bench.pydeps, bench.dashboard), with more settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import report, report_more, sections_more, suite
from .common import BenchPG

REPO = Path(__file__).resolve().parent.parent

SECTIONS = ["overhead", "scaling", "queue", "idle", "recovery", *sections_more.SECTIONS]
# What the bench extra (pip install -e '.[bench]') brings, and what needs it: the charts of
# every report, and the queue section's peer.
EXTRAS = {"matplotlib": "the report's charts", "pgqueuer": "the queue section's peer"}


def missing_extras(only: list[str], replot: bool = False) -> list[str]:
    """The bench extra's packages that a run of the ``only`` sections needs and this
    Python lacks (checked before anything starts: the queue section comes minutes in)."""
    import importlib.util

    need = ["matplotlib"] + (["pgqueuer"] if "queue" in only and not replot else [])
    return [m for m in need if importlib.util.find_spec(m) is None]


def machine_info(note: str) -> dict:
    import psutil

    try:
        import pgqueuer

        pgq = getattr(pgqueuer, "__version__", "") or __import__("importlib.metadata").metadata.version("pgqueuer")
    except Exception:  # noqa: BLE001
        pgq = "not installed"
    la = os.getloadavg()
    return {"code": code_state(), "host": platform.node(), "os": platform.platform(), "cpus": f"{os.cpu_count()} cores",
            "memory": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
            "python": platform.python_version(), "pgqueuer": pgq,
            "load average at start": f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}", "note": note}


CODE_PATHS = ["sandmill", "server", "worker", "isolation", "store", "profiles"]


def code_state() -> str:
    """The commit measured, and the files of the product (sandmill/, server/, worker/, isolation/, store/, profiles/) that differ
    from it (others may be editing the same tree): a report says exactly what it ran."""
    import hashlib
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", *CODE_PATHS).splitlines()
    if not dirty:
        return f"commit {head}, no uncommitted changes in {', '.join(CODE_PATHS)}"
    digest = hashlib.sha1(git("diff", "HEAD", "--", *CODE_PATHS).encode()).hexdigest()[:8]
    return (f"commit {head} plus uncommitted changes (diff {digest}) in "
            + ", ".join(line.split(maxsplit=1)[-1] for line in dirty))


def notes_for(res: dict) -> dict[str, str]:
    """Why a missed target is missed: what the profile of this code showed, and the fix
    that went in or is proposed. Figures from this run are filled in."""
    out: dict[str, str] = {}
    met = {t["name"]: t["met"] for t in report.targets(res)}
    ov = {(r["backend"], r["language"]): r for r in res.get("overhead", {}).get("rows", [])}
    r = ov.get(("nsjail", "python3"))
    cold = ov.get(("nsjail-cold", "python3"))
    if r and met.get("python3 on nsjail, one worker") is False:
        cold_txt = (f" The same jobs with a fresh interpreter each (`nsjail-cold`): {cold['jps']['median']:.1f}"
                    " jobs/s." if cold else "")
        out["python3 on nsjail, one worker"] = (
            f"{r['jps']['median']:.1f} jobs/s = {1000 / r['jps']['median']:.0f} ms a job, with"
            f" {100 * r.get('warm_share', 0):.0f}% of the jobs forked from a warm interpreter inside the jail"
            f" (no interpreter start: the bare `python3 -c pass` alone is {r['bare']['median']:.0f} ms here)."
            + cold_txt + " What a job still costs on one subworker, in order: the claim and the completion"
            " (one statement each, or one when a busy slot completes and claims together), the work dir and"
            " cgroup limits (about 1.5 ms), the job process's own set-up on its job (bind mount, /tmp, rlimits,"
            " capabilities: under 1 ms), the script, the end of its namespaces (1-2 ms), and reading the result"
            " back; the job process for the next job is forked meanwhile. On this machine 2 cores carry"
            " PostgreSQL, the server, the worker and the bench's own HTTP client submitting the batch, so the"
            " figure moves with the load (see the load averages above).")
    bash = [x for x in ov.values() if x["language"] == "bash" and x["jps"]["median"] < report.WINDMILL["bash"]]
    if bash:
        out["bash beside Windmill (no target, for scale)"] = (
            "bash jobs: " + ", ".join(f"{x['backend']} {x['jps']['median']:.0f}" for x in bash)
            + " jobs/s on one worker against Windmill's ~120. On process, nsjail and docker a bash job is exec'd by a"
            " job process forked ahead into its namespaces and cgroup (warm exec), so the sandbox set-up is off"
            " the job's path; what remains is bash itself, the worker path (claim, completion) and, unlike"
            " the python3 job, a log line to store (`echo 1` prints: one more write to the database); on docker"
            " the job process is forked in an already running container (cold docker, `warm: false`, starts a"
            " container per job: ~150-250 ms).")
    if met.get("scaling at 100 subworkers") is False:
        sc = res["scaling"]["rows"][-1]
        gap_ms = 100 / sc["efficiency"]["median"] - 100
        out["scaling at 100 subworkers"] = (
            f"{sc['jps']['median']:.0f} jobs/s of {sc['ideal']:.0f}: each 100 ms job costs about {gap_ms:.1f} ms"
            " more, end to end, than its 100 ms; 99% needs at most 1 ms, the start and the end of the drain"
            " included. In place: **claim ahead** (`docs/worker-groups.md`: a busy subworker's next job is in"
            " hand when the current one ends; completions of slots whose next job runs share one statement);"
            " **a job runs inline in its slot's task** (from one job's end to the next one's start is one loop"
            " step: 0.05-0.07 ms, was 0.6-1.5 ms with a task per job) and sets **one timer** (its heartbeat and"
            " held-job give-back come from one watch per worker); **timers that end on time**"
            " (`worker/eventloop.py`: a timerfd in the epoll set; asyncio's own wait is rounded up to the next"
            " millisecond); claim and completion connections prepared at start, with **generic plans** from"
            " the first run (the rarely used ones planned the statement anew, 1.5-6 ms, at every burst's"
            " start and end); **start-up objects frozen** out of garbage collection; a burst's **first claims"
            " take only the jobs that run now**; and at the drain's end the **last completions of a process"
            " go in one statement** (were up to 7, which delayed the jobs still ending by 1.3-3.8 ms). The"
            " drain is timed between PostgreSQL's commit timestamps; timed from when the queueing commit"
            " returned to the harness (6-13 ms later on this machine), as the reports before this one were,"
            " the same drains read 0.3-0.6 points higher. The figure moves with the host's load: on the"
            " 2-core VM of the reference the same code read 98.5-99.0% on a busy day and 99.1-99.4% (18"
            " drains) on a quieter one. Where the rest goes, traced in the 4 worker processes (quieter day,"
            " busy day): the queueing commit's NOTIFY reaches them 1-3 (1-6) ms after the commit, and their"
            " claims of 25 jobs (0.4 ms of execution alone) come back 1.5-5 (4-13) ms later (4 claims, their"
            " commits and 4 worker processes on 2 cores at once), so the first jobs start 3-8 (7-17) ms after"
            " the commit. Then each slot runs a chain of 20 jobs and the drain ends with the slowest chain,"
            " which loses 5-9 (9-17) ms: a sleep ends 0.2-0.5 ms late (median), of which the VM's wake-up is"
            " 0.07-0.2 ms and the rest the other slots' job ends of the process handled in the same moment"
            " (25 jobs end within 1-4 ms in each 100 ms round; the first round, whose jobs all started"
            " within 0.5 ms, is the latest). The last completion commits 1-3 ms after the last job ends. Adding 0.1"
            " ms of CPU to each job's end takes the figure down 0.45 points: what remains is the worker's own"
            " time per job end on 2 cores shared with PostgreSQL. With `synchronous_commit` off the burst's"
            " claims come back 1-4 ms sooner; sandmill does not turn it off (a claim or completion lost in a"
            " database crash would run its job twice).")
    if met.get("queue throughput vs pgqueuer") is False:
        q = res["queue"]
        out["queue throughput vs pgqueuer"] = (
            f"sandmill {q['sandmill']['median']:.0f} vs pgqueuer {q['pgqueuer']['median']:.0f} jobs/s"
            f" ({q['ratio']['median']:.2f}x, {q['ratio']['min']:.2f}-{q['ratio']['max']:.2f} across the runs). Both"
            " move by 20-50% from run to run on this machine (pgqueuer: 2,950-3,250 jobs/s in one run of this"
            " section alone, 3,800-4,550 in this one; sandmill 3,100-4,400); the ratio has come out between"
            " 0.9x and 1.8x. How sandmill's drain runs: 8 subworkers (the native profile's); with jobs this"
            " short each slot holds up to 8 jobs ahead (claim ahead, as many as run in 5 ms), so it works on"
            " through its completion's round trip, and a statement carries the completions, start stamps and"
            " claims of several jobs. pgqueuer's drain runs 5 consumers with 10 jobs each in flight (50) and"
            " logs completions in buffered batches.")
    if met.get("idle cluster load") is False:
        out["idle cluster load"] = "Idle load over target: see the per-window chart; the pings of workers and monitor dominate."
    out.update(report_more.notes(res, met))
    return out


def print_tables(con: Console, res: dict) -> None:
    ov = res.get("overhead", {}).get("rows", [])
    if ov:
        t = Table(title="1. per-job overhead, one worker")
        for c in ("backend", "lang", "bare p50 ms", "latency p50 ms", "p95 ms", "overhead ms", "jobs/s (min-max)",
                  "warm", "Windmill"):
            t.add_column(c)
        for r in ov:
            t.add_row(r["backend"], r["language"], f"{r['bare']['median']:.1f}", f"{r['latency']['median']:.1f}",
                      f"{r['latency']['p95']:.1f}", f"{r['overhead_ms']:.1f}",
                      f"{r['jps']['median']:.1f} ({r['jps']['min']:.1f}-{r['jps']['max']:.1f})",
                      f"{100 * r.get('warm_share', 0):.0f}%", f"{report.WINDMILL[r['language']]:g}")
        con.print(t)
    sc = res.get("scaling", {}).get("rows", [])
    if sc:
        t = Table(title=f"2. scaling: {res['scaling']['jobs']} x 100 ms native sleep jobs")
        for c in ("subworkers", "processes", "ideal", "jobs/s (min-max)", "% ideal"):
            t.add_column(c)
        for r in sc:
            t.add_row(str(r["subworkers"]), str(r["processes"]), f"{r['ideal']:.0f}",
                      f"{r['jps']['median']:.1f} ({r['jps']['min']:.1f}-{r['jps']['max']:.1f})",
                      f"{100 * r['efficiency']['median']:.1f}%")
        con.print(t)
    q = res.get("queue")
    if q:
        t = Table(title=f"3. queue drain, {q['jobs']} no-op jobs")
        for c in ("sandmill jobs/s", "pgqueuer jobs/s", "ratio"):
            t.add_column(c)
        t.add_row(f"{q['sandmill']['median']:.0f}", f"{q['pgqueuer']['median']:.0f}", f"{q['ratio']['median']:.2f}x")
        con.print(t)
    t = Table(title="targets")
    for c in ("what", "target", "this run", "verdict", "short by"):
        t.add_column(c)
    for x in report.targets(res):
        t.add_row(x["name"], x["target"], x["value"],
                  "n/a" if x["met"] is None else ("[green]met" if x["met"] else "[red]missed"), x["gap"])
    con.print(t)
    if "recovery" in res:
        s = res["recovery"]["spread"]
        con.print(f"5. recovery: median {s['median']:.2f} s (min {s['min']:.2f}, max {s['max']:.2f}, n={s['n']})")
    report_more.print_tables(con, res)


def run(out: Path, quick: bool = False, only: list[str] | None = None,
        note: str = "", console: Console | None = None, counts: suite.Counts | None = None) -> dict:
    """Run the set and write the report under ``out``; returns the results. ``counts``:
    other sizes than the full set's or --quick's (the smoke tests' tinier ones)."""
    con = console or Console(width=None if sys.stdout.isatty() else 140)
    counts = counts or (suite.QUICK if quick else suite.Counts())
    only = only or SECTIONS
    machine = machine_info(note or "noisy: shared with other engineers' test runs, timings vary run to run")
    res: dict = {"quick": quick}
    t0 = time.monotonic()
    bp = BenchPG()
    try:
        for name in only:
            con.rule(f"[bold]{name}")
            fn = {"overhead": suite.overhead, "scaling": suite.scaling, "queue": suite.queue_throughput,
                  "idle": suite.idle, "recovery": suite.recovery, **sections_more.SECTIONS}[name]
            res[name] = fn(bp, counts, log=con.print)
    finally:
        bp.close()
    res["elapsed_s"] = time.monotonic() - t0
    res["pgqueuer_version"] = machine["pgqueuer"]
    end_code = code_state()
    if end_code != machine["code"]:
        machine["code at end"] = end_code + " (the code changed during the run)"
    la = os.getloadavg()
    machine["load average at end"] = f"{la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
    print_tables(con, res)
    cmd = "python -m bench " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("__main__.py") else "python -m bench"
    res["command"] = cmd
    report.write(res, out, machine, cmd, notes_for(res))
    con.print(f"report: {out / 'report.md'}")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="folder for report.md, the PNGs and results.json")
    ap.add_argument("--quick", action="store_true", help="tiny counts, process backend only: a smoke run")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--note", default="", help="a line about the machine for the report")
    ap.add_argument("--replot", action="store_true",
                    help="run nothing: write report.md and the PNGs again from OUT/results.json")
    a = ap.parse_args(argv)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s): {', '.join(bad)}")
    missing = missing_extras(only, a.replot)
    if missing:
        print("python -m bench: missing " + ", ".join(f"{m} ({EXTRAS[m]})" for m in missing)
              + "; install the bench extra: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    if a.replot:
        res = json.loads((a.out / "results.json").read_text())
        machine = res.pop("machine")
        report.write(res, a.out, machine, res.get("command", "python -m bench"), notes_for(res))
        print_tables(Console(width=140), res)
        return 0
    run(a.out, quick=a.quick, only=only, note=a.note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
