"""Python dependencies: what a job with requirements costs, beside one without, same run.

    python -m bench.pydeps [--backend process|nsjail|docker] [--jobs 30] [--locks 3] [--quick]

On one worker (a fresh environment cache, so nothing is installed before):

- **no deps**: submit->result latency (run_wait_result) of a script importing only the
  standard library;
- **first job of a new lock**: from ``scripts/create`` of a script with a new
  requirement set to its first job's result, that job pushed at once: resolution
  (uv pip compile) + install + the run, whichever of the dependency job and the job
  gets there first (``--locks`` different pins of six/idna, each new);
- **later jobs**: the latency of that script's next jobs (the environment installed).

Each row says how many of its jobs ran warm (forked from a warm interpreter).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import time
import uuid
from pathlib import Path

from .common import BenchPG, spread

PROFILE = """
name: pydeps
tags: [pydeps]
backend: {{kind: {backend}}}
subworkers: 1
"""
NO_DEPS = "import json\n\n\ndef main():\n    return json.dumps([1])\n"
# distinct requirement sets: each is a new lock (a new resolution and environment)
PINS = ["six==1.17.0", "six==1.16.0", "idna==3.10", "six==1.15.0", "idna==3.7", "idna==3.6"]
WITH_DEPS = "# requirements:\n# {pin}\n\nimport {mod}\n\n\ndef main():\n    return {mod}.__name__\n"


async def _latencies(c, ws: str, h: str, n: int) -> tuple[list[float], int]:
    out, warm = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        r = await c.post(f"/api/w/{ws}/jobs/run_wait_result/h/{h}", json={})
        out.append((time.perf_counter() - t0) * 1000)
        assert r.status_code == 200, r.text
        j = (await c.get(f"/api/w/{ws}/jobs_u/get/{r.headers['x-sandmill-job-id']}")).json()
        warm += bool((j.get("outcome") or {}).get("warm"))
    return out, warm


async def _create(c, ws: str, path: str, content: str) -> str:
    r = await c.post(f"/api/w/{ws}/scripts/create",
                     json={"path": path, "content": content, "language": "python3", "tag": "pydeps"})
    assert r.status_code == 201, r.text
    return r.text


async def measure(cluster, jobs: int, locks: int) -> dict:
    ws = "bench"
    res: dict = {}
    async with cluster.async_client() as c:
        h = await _create(c, ws, "f/bench/nodeps", NO_DEPS)
        await _latencies(c, ws, h, 3)  # warm up connections and the warm interpreter
        lat, warm = await _latencies(c, ws, h, jobs)
        res["no deps"] = {"ms": spread(lat), "warm": warm, "n": jobs}
        firsts, later, later_warm = [], [], 0
        for i, pin in enumerate(PINS[:locks]):
            content = WITH_DEPS.format(pin=pin, mod=pin.split("==")[0])
            t0 = time.perf_counter()
            h = await _create(c, ws, f"f/bench/deps{i}", content)
            r = await c.post(f"/api/w/{ws}/jobs/run_wait_result/h/{h}", json={})
            firsts.append((time.perf_counter() - t0) * 1000)
            assert r.status_code == 200, r.text
            lat, warm = await _latencies(c, ws, h, max(1, jobs // locks))
            later += lat
            later_warm += warm
        res["first job of a new lock"] = {"ms": spread(firsts), "n": len(firsts)}
        res["later jobs"] = {"ms": spread(later), "warm": later_warm, "n": len(later)}
    return res


def run(backend: str = "process", jobs: int = 30, locks: int = 3, bp: BenchPG | None = None) -> dict:
    """The three rows on one worker of ``backend``; on ``bp`` (the suite's PostgreSQL, this
    section's database dropped after) or on one of its own."""
    own = bp is None
    bp = bp or BenchPG()
    cache = Path("/var/cache/sandmill") / f"bench-pydeps-{uuid.uuid4().hex[:8]}"
    url = None
    try:
        url = bp.database("pydeps")
        cluster = bp.cluster(url, "pydeps", env={"SANDMILL_PYDEPS_DIR": str(cache)})
        try:
            cluster.start_server()
            cluster.start_worker("pydeps", profile_text=PROFILE.format(backend=backend))
            cluster.wait_workers("pydeps", timeout=60)
            res = asyncio.run(measure(cluster, jobs, locks))
        finally:
            cluster.stop()
    finally:
        if own:
            bp.close()
        elif url:
            bp.drop(url)
        shutil.rmtree(cache, ignore_errors=True)
    return {"backend": backend, "rows": res}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pydeps", description=__doc__.split("\n")[0])
    ap.add_argument("--backend", default="process", choices=["process", "nsjail", "docker"])
    ap.add_argument("--jobs", type=int, default=30, help="jobs timed per row")
    ap.add_argument("--locks", type=int, default=3, help=f"new locks timed (at most {len(PINS)})")
    ap.add_argument("--quick", action="store_true", help="5 jobs, 1 new lock: a smoke run")
    a = ap.parse_args(argv)
    jobs, locks = (5, 1) if a.quick else (a.jobs, min(a.locks, len(PINS)))
    res = run(a.backend, jobs, locks)
    print(f"python dependencies, backend {res['backend']} (submit->result, ms)")
    print(f"{'':26} {'n':>4} {'p50':>9} {'p95':>9} {'min':>9} {'max':>9}  warm")
    for name, r in res["rows"].items():
        s = r["ms"]
        warm = f"{r['warm']}/{r['n']}" if "warm" in r else "-"
        print(f"{name:26} {r['n']:>4} {s['median']:>9.1f} {s['p95']:>9.1f} {s['min']:>9.1f} {s['max']:>9.1f}  {warm}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
