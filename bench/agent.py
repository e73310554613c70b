"""Agent workers: what going over HTTP costs.

    python -m bench.agent [--jobs 20000] [--rounds 5] [--agents 200] [--idle-s 60] [--quick]
                          [--versus NAME=VALUE,...]

1. throughput: no-op jobs drained by one agent worker with 8 subworkers vs one DB worker
   with 8 subworkers, same server, same database, same run, alternating rounds (the goal:
   the agent at 80% of the DB worker or more). Timed between PostgreSQL's commit
   timestamps: the enqueue's commit to the last completion's (as bench.drain). 20,000
   jobs a drain by default: a 3,000-job drain lasts under 0.6 s, mostly the ramp-up of
   the first claims, and its share swung from 46% to 77% between runs. The figure is the
   median of the rounds' shares (each round: an agent drain over the DB worker's drain just
   before it), over 5 rounds by default: on a shared machine one round of either side may
   stall, and a ratio of two medians mixes rounds run under different loads. Beside it: the
   jobs/s of each side (median), each round's share, and the CPU ms per 1,000 jobs of the
   server and the worker.
2. idle: ``--agents`` idle agents simulated by one process of as many client loops (each
   an ``AgentStore`` over its own HTTP connection, doing what an idle agent worker does:
   its long poll every 25 s, which carries its ping, and its idle slots' claim every
   60 s) against one server: the server's CPU (share of one core) and the database's
   committed transactions per second, over ``--idle-s`` after they have all registered
   (goals: under 5% of a core, under 5 tx/s).

The same idle measure of the server with no agent is printed beside it.
--quick: 300 jobs, 1 round, 20 agents for 6 s (a smoke run, under a minute).
BENCH_AGENT_<NAME>=value in the environment sets <NAME> for the agent process only (to
try its settings: BENCH_AGENT_SANDMILL_CLAIM_AHEAD_MAX=64). ``--versus NAME=VALUE,...``
starts a second agent worker with those settings, drained in the same rounds (a third
drain each round): on a shared machine, the only comparison of two settings to trust.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
import uuid

import psutil

from sandmill.store import db as dbmod

from .common import BenchPG, commit_time, enqueue, last_completion_time, wait_drained, wait_registered
from .idle_load import measure_commits_per_s

NATIVE_AGENT = """
name: {group}
tags: [{tag}]
native: true
subworkers: {subworkers}
limits: {{wall_s: 300}}
"""


AGENT_ENV = {k[len("BENCH_AGENT_"):]: v for k, v in os.environ.items() if k.startswith("BENCH_AGENT_")}


def _token(cluster, group: str, tags: list[str]) -> str:
    with cluster.client() as api:
        r = api.post("/api/agent_workers/create_agent_token",
                     json={"worker_group": group, "tags": tags, "exp": int(time.time()) + 86400})
        r.raise_for_status()
        return r.text


async def _drain(url: str, tag: str, jobs: int) -> float:
    econn, conn = await dbmod.connect(url), await dbmod.connect(url)
    try:
        xid = await enqueue(econn, jobs, tag=tag, language="noop", args={})
        t_commit = time.monotonic()
        t_end = await wait_drained(conn, jobs, tag, 600)
        committed, last = await commit_time(conn, xid), await last_completion_time(conn, tag)
    finally:
        await econn.close()
        await conn.close()
    drain_s = last - committed if last is not None and committed is not None else t_end - t_commit
    return jobs / drain_s


def throughput(bp: BenchPG, jobs: int, rounds: int, subworkers: int = 8,
               versus: dict[str, str] | None = None) -> dict:
    """Jobs/s of one DB worker and one agent worker (``subworkers`` each), alternating.
    With ``versus`` (environment settings), a second agent worker with those settings is
    drained in the same rounds too (``agent_b``): a setting's effect, measured in one run."""
    url = bp.database("agent")
    c = bp.cluster(url, "agent")
    try:
        c.start_server()
        sides = ["db", "agent"] + (["agent_b"] if versus is not None else [])
        tags = {k: f"{k.replace('_', '')[:4]}{uuid.uuid4().hex[:6]}" for k in sides}
        c.start_worker("gdb", profile_text=NATIVE_AGENT.format(group="gdb", tag=tags["db"], subworkers=subworkers))
        procs = {"server": psutil.Process(c.procs[0].pid), "db worker": psutil.Process(c.procs[1].pid)}
        for kind in sides[1:]:
            group = "g" + kind.replace("_", "")
            prof = c.tmp / f"{kind}.yaml"
            prof.write_text(NATIVE_AGENT.format(group=group, tag=tags[kind], subworkers=subworkers))
            env = {**AGENT_ENV, **(versus or {})} if kind == "agent_b" else AGENT_ENV
            p = c.spawn("worker", "--profile", str(prof), "--agent", "--url", c.base,
                        env={"DATABASE_URL": "", "SANDMILL_AGENT_TOKEN": _token(c, group, [tags[kind]]), **env})
            procs[kind.replace("_", " ")] = psutil.Process(p.pid)
        asyncio.run(wait_registered(url, "gdb", 1))
        for kind in sides[1:]:
            asyncio.run(wait_registered(url, "g" + kind.replace("_", ""), 1))
        time.sleep(0.5)
        out: dict[str, list[float]] = {k: [] for k in sides}
        cpu_ms: dict[str, dict[str, float]] = {k: {} for k in sides}  # CPU ms per 1000 jobs, by process
        for _ in range(rounds):
            for kind in sides:
                bp.vacuum(url)
                bp.checkpoint()
                before = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
                out[kind].append(asyncio.run(_drain(url, tags[kind], jobs)))
                for k, p in procs.items():
                    cpu_ms[kind][k] = cpu_ms[kind].get(k, 0.0) + (sum(p.cpu_times()[:2]) - before[k]) * 1e6 / (jobs * rounds)
        db, ag = statistics.median(out["db"]), statistics.median(out["agent"])
        shares = [a / d for a, d in zip(out["agent"], out["db"])]  # each round: the drains in a row
        res = {"jobs": jobs, "rounds": rounds, "subworkers": subworkers, "db_jobs_per_s": out["db"],
               "agent_jobs_per_s": out["agent"], "db_median": db, "agent_median": ag,
               "round_shares": shares, "agent_share": statistics.median(shares),
               "share_of_medians": ag / db, "cpu_ms_per_1000_jobs": cpu_ms}
        if versus is not None:
            b_shares = [b / d for b, d in zip(out["agent_b"], out["db"])]
            res["agent_b"] = {"env": versus, "jobs_per_s": out["agent_b"], "median": statistics.median(out["agent_b"]),
                              "round_shares": b_shares, "share": statistics.median(b_shares)}
        return res
    finally:
        c.stop()
        bp.drop(url)


async def _idle_agent(base: str, token: str, i: int, started: asyncio.Event, ping_s: float, poll_s: float) -> None:
    """What one idle agent worker sends (worker/agent_worker.py): register; its long poll,
    for good, carrying its ping (taken every ``ping_s``); its idle slots' claim every
    ``poll_s`` (and their next-due read, which the empty claim's answer serves)."""
    import jwt

    from sandmill.worker.agent_client import AgentClient
    from sandmill.worker.agent_store import AgentStore

    jti = jwt.decode(token[len("jwt_agent_"):], options={"verify_signature": False})["jti"]
    name = f"idle-{i}@{jti[:12]}"
    client = AgentClient(base, token)
    store = AgentStore(client, name, None)
    try:
        await store.register(client, name=name, group="gidle", hostname="bench", tags=["idle"],
                             backend="native", subworkers=8, info={})
        r = await client.post("listen", {"name": name, "cursor": None, "wait_s": 0})
        cursor = r["cursor"]
        await started.wait()

        async def listen() -> None:
            nonlocal cursor
            await asyncio.sleep(random.uniform(0, 1))
            while True:
                r = await client.post("listen", {"name": name, "cursor": cursor, "wait_s": 25,
                                                 "stats": store.take_stats()}, timeout=40)
                cursor = r["cursor"]

        async def ping() -> None:
            await asyncio.sleep(random.uniform(0, ping_s))
            while True:
                await store.ping(client, name, tags=["idle"], jobs_done=0, busy=0, occupancy=0.0)
                await asyncio.sleep(ping_s)

        async def idle() -> None:
            await asyncio.sleep(random.uniform(0, poll_s))
            while True:
                await store.pull_many(client, name, ["idle"], 8)
                await store.pull(client, name, ["idle"])
                await store.next_due(client, ["idle"])
                await asyncio.sleep(poll_s)

        await asyncio.gather(listen(), ping(), idle())
    finally:
        await client.close()


def idle(bp: BenchPG, agents: int, seconds: float, ping_s: float = 15.0, poll_s: float = 60.0,
         warmup_s: float = 15.0) -> dict:
    """The server's CPU and the database's tx/s with ``agents`` idle agents."""
    url = bp.database("agentidle")
    c = bp.cluster(url, "agentidle")
    try:
        server = psutil.Process(c.start_server().pid)
        token = _token(c, "gidle", ["idle"])

        async def run() -> dict:
            started = asyncio.Event()
            tasks = [asyncio.create_task(_idle_agent(c.base, token, i, started, ping_s, poll_s))
                     for i in range(agents)]
            await wait_registered(url, "gidle", agents, timeout=120)
            started.set()
            # the phases spread, and the statistics of the registrations reach the counters
            # (a backend reports its commits up to 10 s late when it goes idle)
            await asyncio.sleep(warmup_s)
            cpu0, t0 = server.cpu_times(), time.monotonic()
            tx = await measure_commits_per_s(url, seconds)
            cpu1, t1 = server.cpu_times(), time.monotonic()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            bad = [t.exception() for t in tasks if not t.cancelled() and t.exception()]
            if bad:
                raise RuntimeError(f"{len(bad)} simulated agent(s) failed: {bad[0]!r}")
            cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / (t1 - t0)
            return {"agents": agents, "seconds": seconds, "server_cpu_share": cpu, "tx_per_s": tx}

        return asyncio.run(run())
    finally:
        c.stop()
        bp.drop(url)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--idle-s", type=float, default=60)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="write the figures to this file")
    ap.add_argument("--versus", metavar="NAME=VALUE[,NAME=VALUE]",
                    help="drain a second agent worker with these environment settings in the same rounds")
    a = ap.parse_args()
    if a.quick:
        a.jobs, a.rounds, a.agents, a.idle_s = 300, 1, 20, 6
    bp = BenchPG()
    try:
        versus = dict(kv.split("=", 1) for kv in a.versus.split(",")) if a.versus else None
        tp = throughput(bp, a.jobs, a.rounds, versus=versus)
        print(f"throughput, no-op jobs, 8 subworkers, {tp['jobs']} jobs x {tp['rounds']} round(s):"
              f" agent at {100 * tp['agent_share']:.0f}% of the DB worker (median of the rounds' shares;"
              f" goal >= 80%); DB worker {tp['db_median']:.0f} jobs/s, agent {tp['agent_median']:.0f} jobs/s"
              f" (medians: {100 * tp['share_of_medians']:.0f}%)"
              f"  [rounds: DB {', '.join(f'{x:.0f}' for x in tp['db_jobs_per_s'])};"
              f" agent {', '.join(f'{x:.0f}' for x in tp['agent_jobs_per_s'])}]")
        print("  share by round: " + ", ".join(f"{100 * x:.0f}%" for x in tp["round_shares"]))
        if (b := tp.get("agent_b")) is not None:
            print(f"  agent with {a.versus}: {100 * b['share']:.0f}% of the DB worker, {b['median']:.0f} jobs/s;"
                  " by round: " + ", ".join(f"{100 * x:.0f}%" for x in b["round_shares"]))
        for kind, by in tp["cpu_ms_per_1000_jobs"].items():
            print(f"  CPU ms per 1000 jobs, {kind} drain: " + ", ".join(f"{k} {v:.0f}" for k, v in by.items()))
        warmup = 3.0 if a.quick else 15.0
        base = idle(bp, 0, a.idle_s, warmup_s=warmup)  # the server alone: its monitor, its own reads
        il = idle(bp, a.agents, a.idle_s, warmup_s=warmup)
        il["baseline"] = base
        print(f"idle: {il['agents']} agents over {il['seconds']:.0f} s: server CPU"
              f" {100 * il['server_cpu_share']:.1f}% of a core (goal < 5%),"
              f" database {il['tx_per_s']:.2f} tx/s (goal < 5); the server alone:"
              f" {100 * base['server_cpu_share']:.1f}%, {base['tx_per_s']:.2f} tx/s")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"throughput": tp, "idle": il}, f, indent=1)
    finally:
        bp.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
