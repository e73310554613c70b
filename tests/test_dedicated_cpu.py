"""A dedicated job's cpu_ms: the CPU its runtime used while the job ran, measured in the
runtime (getrusage around main()) and sent in the job's result frame."""

from __future__ import annotations

import pytest

from test_dedicated import done, group, run, script

BURN = """
import subprocess, sys, time
def main(mode, ms):
    end = time.thread_time() + ms / 1000
    if mode == "burn":
        while time.thread_time() < end:
            pass
    elif mode == "child":  # a child the job waits for counts too
        subprocess.run([sys.executable, "-c", f"import time\\nend = time.process_time() + {ms / 1000}\\n"
                        "while time.process_time() < end: pass"], check=True)
    elif mode == "fail":
        while time.thread_time() < end:
            pass
        raise ValueError("burnt")
    else:
        time.sleep(ms / 1000)
    return mode
"""


@pytest.mark.parametrize("kind", ["process", "nsjail"])
def test_cpu_ms_is_the_jobs_own(make_cluster, ws, kind):
    c = make_cluster()
    with c.client() as api:
        script(api, ws, "f/burn", BURN)
        group(c, ws, ["f/burn"], kind=kind, wall=20)
        ids = {m: run(api, ws, "f/burn", {"mode": m, "ms": 300})
               for m in ("burn", "sleep", "fail", "child")}
        jobs = {m: done(api, ws, j) for m, j in ids.items()}
    assert jobs["burn"]["success"] and jobs["burn"]["result"] == "burn", jobs["burn"]
    assert 250 <= jobs["burn"]["cpu_ms"] <= 2000, jobs["burn"]
    assert jobs["sleep"]["cpu_ms"] < 100, jobs["sleep"]  # waiting is not CPU
    assert not jobs["fail"]["success"] and 250 <= jobs["fail"]["cpu_ms"] <= 2000, jobs["fail"]
    assert jobs["child"]["success"] and 250 <= jobs["child"]["cpu_ms"] <= 3000, jobs["child"]
