"""Autoscaling: a ramp (idle -> burst -> idle) on `sandmill up` with one group autoscaled
by the local integration (min 0, max 4), sampled every 0.5 s.

    python -m bench.autoscale [--quick] [--out DIR]

Reports the workers over time against the queue depth (a chart, DIR/autoscale.png, with
matplotlib; a text table always), the time from the burst's commit to the first scale-out
event and to the first job started, the p95 queue wait (started_at - created_at) of the
burst's jobs, and the time back to zero after the queue empties. Short settings
(SANDMILL_AUTOSCALE_INTERVAL_S=1, cooldown 3 s, worker pings every 1 s) so it takes a few
minutes; --quick: a smaller burst (a smoke run, under a minute)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .common import BenchPG, pct

GROUP, TAG = "ramp", "ramp"
ENV = {"SANDMILL_AUTOSCALE_INTERVAL_S": "1", "SANDMILL_WORKER_PING_S": "1", "SANDMILL_UP_SCALE_POLL_S": "0.5",
       "SANDMILL_ADMIN_TOKEN": "bench-token", "SANDMILL_GRACE_S": "10"}


def profile(quick: bool) -> str:
    return json.dumps({"name": GROUP, "tags": [TAG], "native": True, "subworkers": 5 if quick else 10,
                       "autoscaling": {"enabled": True, "min_workers": 0, "max_workers": 2 if quick else 4,
                                       "cooldown_seconds": 2 if quick else 3, "full_scale_cooldown_seconds": 3 if quick else 6,
                                       "inc_num_workers": 1}})


def burst_waves(quick: bool) -> list[tuple[float, int, float]]:
    """The burst: (seconds after its start, jobs, each job's sleep in seconds) per wave."""
    return [(0.0, 40, 0.5)] if quick else [(0.0, 100, 1.0), (2.0, 100, 1.0), (4.0, 100, 1.0), (6.0, 100, 1.0)]


async def _sample(conn) -> dict:
    r = await conn.fetchrow(
        "SELECT (SELECT count(*) FROM worker WHERE worker_group = $1) AS workers,"
        " (SELECT desired FROM autoscale_group WHERE worker_group = $1) AS desired,"
        " (SELECT count(*) FROM queue WHERE tag = $2 AND NOT running) AS waiting,"
        " (SELECT count(*) FROM queue WHERE tag = $2 AND running) AS running,"
        " (SELECT count(*) FROM completed_job WHERE tag = $2) AS done", GROUP, TAG)
    return dict(r)


async def ramp(url: str, quick: bool, t_start: float) -> dict:
    from sandmill.store import db as dbmod
    from sandmill.store import queue

    waves = burst_waves(quick)
    idle_s = 2.0 if quick else 10.0
    conn = await dbmod.connect(url)
    samples: list[dict] = []

    async def sample_until(cond, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = await _sample(conn)
            s["t"] = time.monotonic() - t_start
            samples.append(s)
            if cond(s):
                return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"timed out; last sample {samples[-1]}")

    try:
        await sample_until(lambda s: False if time.monotonic() - t_start < idle_s else True, idle_s + 5)
        burst_at = time.time()
        burst_t = time.monotonic() - t_start
        total = 0
        for at, n, secs in waves:
            while time.monotonic() - t_start < burst_t + at:
                await asyncio.sleep(0.05)
            async with conn.transaction():
                for _ in range(n):
                    await queue.push(conn, workspace="bench", language="sleep", content="",
                                     args={"seconds": secs}, tag=TAG)
            total += n
            s = await _sample(conn)
            s["t"] = time.monotonic() - t_start
            samples.append(s)
        await sample_until(lambda s: s["done"] >= total, 300)
        empty_t = samples[-1]["t"]
        await sample_until(lambda s: s["workers"] == 0 and s["desired"] == 0, 300)
        first_ev = await conn.fetchval(
            "SELECT extract(epoch FROM min(created_at))::float8 FROM autoscale_event"
            " WHERE worker_group = $1 AND created_at >= to_timestamp($2)", GROUP, burst_at)
        first_start = await conn.fetchval(
            "SELECT extract(epoch FROM min(started_at))::float8 FROM completed_job WHERE tag = $1", TAG)
        waits = [r["w"] for r in await conn.fetch(
            "SELECT extract(epoch FROM started_at - created_at)::float8 AS w FROM completed_job WHERE tag = $1", TAG)]
        events = [dict(r) for r in await conn.fetch(
            "SELECT extract(epoch FROM created_at)::float8 AS at, event_type, from_workers, desired_workers, reason"
            " FROM autoscale_event WHERE worker_group = $1 ORDER BY id", GROUP)]
    finally:
        await conn.close()
    return {"jobs": total, "burst_t": burst_t, "samples": samples,
            "time_to_first_scale_out_s": first_ev - burst_at if first_ev else None,
            "time_to_first_job_start_s": first_start - burst_at if first_start else None,
            "queue_wait_p50_s": pct(waits, 50), "queue_wait_p95_s": pct(waits, 95),
            "queue_wait_max_s": max(waits), "queue_empty_to_zero_s": samples[-1]["t"] - empty_t,
            "max_workers_seen": max(s["workers"] for s in samples),
            "events": [{**e, "at": e["at"] - burst_at} for e in events]}


def chart(res: dict, path: Path, foot: str = "") -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    t = [s["t"] - res["burst_t"] for s in res["samples"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.step(t, [s["waiting"] for s in res["samples"]], where="post", label="jobs waiting", color="tab:orange")
    ax.set_xlabel("seconds since the burst")
    ax.set_ylabel("jobs waiting")
    ax2 = ax.twinx()
    ax2.step(t, [s["workers"] for s in res["samples"]], where="post", label="workers registered", color="tab:blue")
    ax2.step(t, [s["desired"] or 0 for s in res["samples"]], where="post", label="workers asked for",
             color="tab:blue", linestyle="--")
    ax2.set_ylabel("workers")
    top = max([s["workers"] for s in res["samples"]] + [1]) + 0.5
    ax.set_ylim(bottom=-0.05 * ax.get_ylim()[1])
    ax2.set_ylim(-0.05 * top, top)  # zero workers drawn at zero jobs, off the frame
    ax2.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # no half workers
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8)  # below: off the lines
    ax.set_title("autoscaling ramp: idle -> burst -> idle (min 0, max %d)" % res["max_workers_seen"])
    if foot:  # the suite's report: the machine under every chart
        fig.text(0.01, 0.01, foot, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1) if foot else None)
    fig.savefig(path)
    plt.close(fig)
    return True


def run(quick: bool = False, out: Path | None = None, bp: BenchPG | None = None) -> dict:
    """The ramp; on ``bp`` (the suite's PostgreSQL, this section's database dropped after)
    or on one of its own. With ``out``: autoscale.json and the chart there."""
    own = bp is None
    bp = bp or BenchPG()
    up, url = None, None
    try:
        url = bp.database("autoscale")
        prof = bp.tmp / "ramp.yaml"
        prof.write_text(profile(quick))
        from sandmill.localcluster import free_port
        log = open(bp.tmp / "up.log", "wb")
        t_start = time.monotonic()
        up = subprocess.Popen([sys.executable, "-m", "sandmill", "up", "--database-url", url, "--port",
                               str(free_port()), "--data-dir", str(bp.tmp / "data"), "--profile", str(prof)],
                              env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
        res = asyncio.run(ramp(url, quick, t_start))
    finally:
        if up is not None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
        if own:
            bp.close()
        elif url:
            bp.drop(url)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        res["chart"] = str(out / "autoscale.png") if chart(res, out / "autoscale.png") else None
        (out / "autoscale.json").write_text(json.dumps(res, indent=1))
    return res


def print_report(res: dict) -> None:
    print(f"jobs: {res['jobs']}; most workers seen: {res['max_workers_seen']}")
    for k in ("time_to_first_scale_out_s", "time_to_first_job_start_s", "queue_wait_p50_s", "queue_wait_p95_s",
              "queue_wait_max_s", "queue_empty_to_zero_s"):
        v = res[k]
        print(f"  {k:28s} {v:8.2f}" if v is not None else f"  {k:28s}        -")
    print("events (seconds after the burst):")
    for e in res["events"]:
        print(f"  {e['at']:7.2f}  {e['event_type']:15s} {e['from_workers']} -> {e['desired_workers']}  {e['reason']}")
    print("  t(s)  waiting  workers  asked")
    last = None
    for s in res["samples"]:
        row = (s["waiting"], s["workers"], s["desired"])
        if row != last:  # the changes only
            print(f"{s['t'] - res['burst_t']:6.1f}  {s['waiting']:7d}  {s['workers']:7d}  {s['desired'] if s['desired'] is not None else '-':>5}")
            last = row
    if res.get("chart"):
        print(f"chart: {res['chart']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.autoscale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small burst (a smoke run)")
    ap.add_argument("--out", type=Path, default=None, help="write autoscale.json and autoscale.png here")
    args = ap.parse_args(argv)
    print_report(run(args.quick, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
