"""A job program's own time against the gap between one job and the next, as the kernel
saw them: perf's ``sched:sched_process_exec`` and ``sched:sched_process_exit``
tracepoints, system-wide, over a batch (``python -m bench.latency --language bash
--gaps``). With one subworker the jobs run one after the other, so the time per job is
the program's run (its exec to its exit: the program's start-up and its work) plus the
gap (its exit to the next job's exec: the job's end reaching the worker, the result, the
next job's hand-over and its set-up in the sandbox). Only jobs that exec a program show
(bash): a python3 job is a fork of a warm interpreter, with no exec to mark its start.

Needs perf (Debian: ``linux-perf``) and the right to trace the whole system (root).
"""

from __future__ import annotations

import shutil
import signal
import statistics
import subprocess
import time
from pathlib import Path

EVENTS = ("sched:sched_process_exec", "sched:sched_process_exit")


def summarize(script: str, comm: str) -> dict:
    """Runs (exec -> exit of one pid) and gaps (an exit -> the next exec) in ms, from
    ``perf script -F comm,pid,time,event`` output, for processes named ``comm``."""
    events = []
    for line in script.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[0] != comm:
            continue
        kind = "exec" if parts[3].startswith("sched:sched_process_exec") else "exit"
        events.append((float(parts[2].rstrip(":")), kind, parts[1]))
    events.sort()
    started: dict[str, float] = {}
    runs: list[float] = []
    gaps: list[float] = []
    last_exit: float | None = None
    for t, kind, pid in events:
        if kind == "exec":
            started[pid] = t
            if last_exit is not None:
                gaps.append((t - last_exit) * 1000)
                last_exit = None
        elif pid in started:  # a job's exit (not that of a process it started, e.g. a subshell)
            runs.append((t - started.pop(pid)) * 1000)
            last_exit = t
    return {"runs_ms": runs, "gaps_ms": gaps}


def ms_line(xs: list[float]) -> str:
    if len(xs) < 2:
        return "n/a"
    q = statistics.quantiles(xs, n=10)
    return f"p50 {statistics.median(xs):.2f}  p90 {q[8]:.2f}  mean {statistics.mean(xs):.2f} ms"


class GapTrace:
    """perf recording exec/exit events while a batch runs; ``stop`` reads them back."""

    def __init__(self, comm: str, out: Path) -> None:
        if shutil.which("perf") is None:
            raise SystemExit("--gaps needs perf (Debian: apt-get install linux-perf)")
        self.comm = comm
        self.out = out
        argv = ["perf", "record", "-q", "-a", "-o", str(out)]
        for e in EVENTS:
            argv += ["-e", e]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # perf has opened its events before the batch starts
        if self.proc.poll() is not None:
            raise SystemExit(f"perf record failed: {self.proc.stderr.read().decode(errors='replace')[:500]}")

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGINT)  # perf writes its file out on SIGINT
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        script = subprocess.run(["perf", "script", "-i", str(self.out), "-F", "comm,pid,time,event"],
                                capture_output=True, text=True, check=False).stdout
        return summarize(script, self.comm)
