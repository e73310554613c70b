"""The report of `python -m bench`: PNG charts (matplotlib) and report.md, plus the
targets with their verdicts (the feature sections' parts: bench/report_more.py)."""

from __future__ import annotations

import json
from pathlib import Path

from . import report_more

WINDMILL = {"python3": 15.0, "bash": 120.0}  # jobs/s of one standard worker, published
TARGETS = {
    "nsjail_python3_jps": 60.0,  # python3 on nsjail, one worker, jobs/s (>=)
    "nsjail_python3_jps_fast": 200.0,  # the same, standard workers at the limit (>=)
    "nsjail_bash_jps": 300.0,    # bash on nsjail, one worker, jobs/s (>=)
    "bash_overhead_ms": 2.0,     # bash on nsjail: latency p50 above the bare start p50 (<=)
    "scaling_100": 0.99,         # of ideal at 100 subworkers (>=)
    "scaling_500": 0.97,         # of ideal at 500 subworkers, within max_connections 100 (>=)
    "backends_per_worker": 2,    # PostgreSQL backends per idle worker process (<=)
    "queue_ratio": 1.0,          # sandmill / pgqueuer (>=)
    "idle_tx_s": 5.0,            # committed tx/s of an idle cluster (<)
}



def _save(fig, out, name: str, foot: str) -> str:
    """Footer, layout, write, close: the same for every chart. Returns the file name."""
    import matplotlib.pyplot as plt

    fig.text(0.01, 0.01, foot, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spread_txt(s: dict, unit: str, fmt: str = ".1f", kind: str = "p5-p95") -> str:
    lo, hi = (s["p5"], s["p95"]) if kind == "p5-p95" else (s["min"], s["max"])
    return f"median {s['median']:{fmt}} {unit} ({kind} {lo:{fmt}}-{hi:{fmt}}, n={s['n']})"


def _fast_targets(ovh: dict) -> list[dict]:
    """Standard workers at the limit: python3 and bash jobs/s on nsjail, bash's overhead."""
    out = []
    for lang, key in (("python3", "nsjail_python3_jps_fast"), ("bash", "nsjail_bash_jps")):
        r = ovh.get(("nsjail", lang))
        if r:
            v, t = r["jps"]["median"], TARGETS[key]
            out.append({"name": f"{lang} on nsjail, one worker, at the limit", "target": f">= {t:g} jobs/s",
                        "value": f"{v:.1f} jobs/s", "met": v >= t,
                        "gap": f"{100 * (1 - v / t):.0f}% short" if v < t else ""})
    r = ovh.get(("nsjail", "bash"))
    if r:
        v, t = r["overhead_ms"], TARGETS["bash_overhead_ms"]
        batch = 1000.0 / r["jps"]["median"] - r["bare"]["median"]
        out.append({"name": "bash on nsjail, overhead above bare", "target": f"<= {t:g} ms (latency p50 - bare p50)",
                    "value": f"{v:.1f} ms (in the batch: {batch:.1f} ms a job above bare)", "met": v <= t,
                    "gap": f"{v - t:.1f} ms over" if v > t else ""})
    return out


def targets(res: dict) -> list[dict]:
    """[{name, target, value, met, gap}] for what this run measured."""
    out = []
    ovh = {(r["backend"], r["language"]): r for r in res.get("overhead", {}).get("rows", [])}
    r = ovh.get(("nsjail", "python3"))
    if r:
        v = r["jps"]["median"]
        out.append({"name": "python3 on nsjail, one worker", "target": f">= {TARGETS['nsjail_python3_jps']:g} jobs/s",
                    "value": f"{v:.1f} jobs/s", "met": v >= TARGETS["nsjail_python3_jps"],
                    "gap": f"{100 * (1 - v / TARGETS['nsjail_python3_jps']):.0f}% short" if v < TARGETS["nsjail_python3_jps"] else ""})
    elif "overhead" in res:
        why = res["overhead"]["probes"].get("nsjail")
        out.append({"name": "python3 on nsjail, one worker", "target": ">= 60 jobs/s",
                    "value": "not measured" + (f" (nsjail not available: {why})" if why else " (not in this run)"),
                    "met": None, "gap": ""})
    out += _fast_targets(ovh)
    sc = res.get("scaling", {}).get("rows", [])
    if sc:
        top = sc[-1]
        v = top["efficiency"]["median"]
        out.append({"name": f"scaling at {top['subworkers']} subworkers", "target": ">= 99% of ideal",
                    "value": f"{100 * v:.1f}% ({top['jps']['median']:.0f} of {top['ideal']:.0f} jobs/s)",
                    "met": v >= TARGETS["scaling_100"] if top["subworkers"] == 100 else None,
                    "gap": f"{100 * (TARGETS['scaling_100'] - v):.1f} points short" if v < TARGETS["scaling_100"] else ""})
    for r in res.get("scaling", {}).get("large", {}).get("rows", []):
        v = r["efficiency"]["median"]
        out.append({"name": f"scaling at {r['subworkers']} subworkers", "target": ">= 97% of ideal, in 100 connections",
                    "value": f"{100 * v:.1f}% ({r['jps']['median']:.0f} of {r['ideal']:.0f} jobs/s),"
                             f" {r['peak_backends']} backends at peak",
                    "met": v >= TARGETS["scaling_500"] if r["subworkers"] == 500 else None,
                    "gap": f"{100 * (TARGETS['scaling_500'] - v):.1f} points short" if v < TARGETS["scaling_500"] else ""})
    q = res.get("queue")
    if q:
        v = q["ratio"]["median"]
        out.append({"name": "queue throughput vs pgqueuer", "target": ">= 1.0x", "value": f"{v:.2f}x",
                    "met": v >= TARGETS["queue_ratio"],
                    "gap": f"{100 * (1 - v):.0f}% short" if v < TARGETS["queue_ratio"] else ""})
    i = res.get("idle")
    if i:
        v = i["tx_per_s"]
        out.append({"name": "idle cluster load", "target": "< 5 tx/s", "value": f"{v:.2f} tx/s",
                    "met": v < TARGETS["idle_tx_s"], "gap": f"{v - 5:.2f} tx/s over" if v >= 5 else ""})
        b = i.get("backends")
        if b:
            v = b["per_worker_process"]
            out.append({"name": "backends per worker process", "target": "<= 2", "value": f"{v:g}",
                        "met": v <= TARGETS["backends_per_worker"],
                        "gap": f"{v - 2:g} over" if v > TARGETS["backends_per_worker"] else ""})
    return out + report_more.targets(res)  # the feature sections' rows


def charts(res: dict, out: Path, machine: str) -> list[str]:
    plt = _plt()
    made = []
    foot = f"machine: {machine}"

    ov = res.get("overhead", {}).get("rows", [])
    if ov:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        labels = [f"{r['backend'].replace('-', chr(10))}\n{r['language']}" for r in ov]
        xs = range(len(ov))
        ax = axes[0]
        med = [r["latency"]["median"] for r in ov]
        err = [[m - r["latency"]["p5"] for m, r in zip(med, ov)], [r["latency"]["p95"] - m for m, r in zip(med, ov)]]
        ax.bar(xs, med, yerr=err, capsize=4, color="#4c72b0", label="submit -> result (median, p5-p95)")
        ax.plot(xs, [r["bare"]["median"] for r in ov], "k_", markersize=28, mew=2, label="bare interpreter start (median)")
        for x, r in zip(xs, ov):
            ax.annotate(f"{r['latency']['median']:.0f}", (x, r["latency"]["median"]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("ms")
        n = ov[0]["latency"]["n"]
        ax.set_title(f"Per-job latency, one worker, trivial job\n{n} sequential run_wait_result calls per bar"
                     " (docker fewer); median, p5-p95", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[1]
        med = [r["jps"]["median"] for r in ov]
        err = [[m - r["jps"]["min"] for m, r in zip(med, ov)], [r["jps"]["max"] - m for m, r in zip(med, ov)]]
        ax.bar(xs, med, yerr=err, capsize=4, color="#55a868")
        for x, r in zip(xs, ov):
            ax.annotate(f"{r['jps']['median']:.1f}", (x, r["jps"]["median"]), ha="center", va="bottom", fontsize=8)
            ax.plot([x - 0.4, x + 0.4], [WINDMILL[r["language"]]] * 2, "r--", lw=1)
        ax.axhline(TARGETS["nsjail_python3_jps"], color="purple", ls=":", lw=1, label="target: python3 on nsjail >= 60")
        ax.plot([], [], "r--", lw=1, label="Windmill, one standard worker (15 py / 120 bash)")
        ax.set_xticks(list(xs), labels)
        ax.set_ylabel("jobs/s")
        ax.set_title(f"Throughput, one worker: {ov[0]['batch_jobs']} jobs submitted at once,"
                     f" x{ov[0]['jps']['n']} batches; median, min-max", fontsize=9)
        ax.legend(fontsize=7)
        made.append(_save(fig, out, "overhead.png", foot))

    sc = res.get("scaling", {}).get("rows", [])
    if sc:
        fig, ax = plt.subplots(figsize=(7, 4.8))
        n = [r["subworkers"] for r in sc]
        med = [r["jps"]["median"] for r in sc]
        ax.errorbar(n, med, yerr=[[m - r["jps"]["min"] for m, r in zip(med, sc)],
                                  [r["jps"]["max"] - m for m, r in zip(med, sc)]],
                    fmt="o-", capsize=4, label="sandmill (median, min-max)")
        ax.plot(n, [r["ideal"] for r in sc], "k--", label="ideal N x 10 jobs/s")
        ax.plot([100], [981], "r*", markersize=12, label="Windmill: 981 jobs/s at 100 workers")
        big = res["scaling"].get("large", {}).get("rows", [])
        if big:  # on a PostgreSQL of its own at max_connections 100
            bn, bm = [r["subworkers"] for r in big], [r["jps"]["median"] for r in big]
            ax.errorbar(bn, bm, yerr=[[m - r["jps"]["min"] for m, r in zip(bm, big)],
                                      [r["jps"]["max"] - m for m, r in zip(bm, big)]], fmt="s", capsize=4,
                        color="#55a868", label=f"{res['scaling']['large']['jobs']} jobs, max_connections"
                                               f" {res['scaling']['large']['max_connections']}")
            ax.plot([n[-1]] + bn, [sc[-1]["ideal"]] + [r["ideal"] for r in big], "k--")  # the ideal, on
            n, med, sc = n + bn, med + bm, sc + big
            ax.set_xscale("log")
            ax.set_yscale("log")
        for x, m, r in zip(n, med, sc):
            ax.annotate(f"{m:.0f} ({100 * r['efficiency']['median']:.0f}%)", (x, m), textcoords="offset points",
                        xytext=(4, -12), fontsize=8)
        ax.set_xlabel("subworkers (native worker processes x subworkers)")
        ax.set_ylabel("jobs/s")
        ax.set_title(f"Scaling: {res['scaling']['jobs']} native sleep jobs of 100 ms drained,"
                     f" {res['scaling']['repeats']} run(s) per point", fontsize=9)
        ax.legend(fontsize=7)
        made.append(_save(fig, out, "scaling.png", foot))

    q = res.get("queue")
    if q:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        names = [f"sandmill\n(native worker, {q['subworkers']} subworkers)", "pgqueuer\n(5 consumers, batch 10)"]
        ss = [q["sandmill"], q["pgqueuer"]]
        med = [s["median"] for s in ss]
        ax.bar([0, 1], med, yerr=[[m - s["min"] for m, s in zip(med, ss)], [s["max"] - m for m, s in zip(med, ss)]],
               capsize=5, color=["#4c72b0", "#c44e52"])
        for x, m in zip([0, 1], med):
            ax.annotate(f"{m:.0f}", (x, m), ha="center", va="bottom", fontsize=9)
        ax.set_xticks([0, 1], names, fontsize=8)
        ax.set_ylabel("jobs/s")
        ax.set_title(f"Queue drain: {q['jobs']} no-op jobs, {q['repeats']} run(s) each, same PostgreSQL;\n"
                     f"median, min-max; ratio {q['ratio']['median']:.2f}x (target >= 1.0x)", fontsize=9)
        made.append(_save(fig, out, "queue.png", foot))

    i, rc = res.get("idle"), res.get("recovery")
    if i or rc:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        if i:
            ax = axes[0]
            ax.bar(range(1, len(i["windows"]) + 1), i["windows"], color="#8172b2")
            ax.axhline(TARGETS["idle_tx_s"], color="red", ls="--", label="target < 5 tx/s")
            ax.set_xticks(range(1, len(i["windows"]) + 1))
            ax.set_xlabel(f"window ({i['window_s']:g} s each)")
            ax.set_ylabel("committed tx/s")
            ax.set_ylim(0, max(6, max(i["windows"]) * 1.2))
            ax.set_title(f"Idle cluster (server + default + native groups), {i['total_s']:g} s:\n"
                         f"{i['tx_per_s']:.2f} tx/s overall; per window {_spread_txt(i['spread'], 'tx/s', '.2f', 'min-max')}",
                         fontsize=9)
            ax.legend(fontsize=7)
        if rc:
            ax = axes[1]
            ax.bar(range(1, len(rc["seconds"]) + 1), rc["seconds"], color="#ccb974")
            ax.set_xticks(range(1, len(rc["seconds"]) + 1))
            ax.set_xlabel("SIGKILL #")
            ax.set_ylabel("s until the job runs again")
            ax.set_title(f"Recovery: worker SIGKILLed mid-job, {len(rc['seconds'])} time(s);\n"
                         f"{_spread_txt(rc['spread'], 's', '.2f', 'min-max')}; ping timeout {rc['ping_timeout_s']:g} s,"
                         f" monitor every {rc['monitor_every_s']:g} s", fontsize=9)
        made.append(_save(fig, out, "idle_recovery.png", foot))
    return made + report_more.charts(res, out, foot, plt)


def _verdict(m) -> str:
    return "n/a" if m is None else ("**met**" if m else "**missed**")


def markdown(res: dict, machine: dict, pngs: list[str], cmd: str, notes: dict[str, str]) -> str:
    L = ["# sandmill benchmark report", "",
         f"Command: `{cmd}` ({res['elapsed_s'] / 60:.1f} min).", "",
         "## Machine", ""]
    L += [f"- {k}: {v}" for k, v in machine.items()]
    L += ["", "## Targets", "", "| what | target | this run | verdict | short by |", "|---|---|---|---|---|"]
    for t in targets(res):
        L.append(f"| {t['name']} | {t['target']} | {t['value']} | {_verdict(t['met'])} | {t['gap']} |")
    ov = res.get("overhead")
    if ov:
        L += ["", "## 1. Per-job overhead, one worker", "",
              "Trivial job (`def main(): return 1`, `echo 1`) through the HTTP API on a one-subworker worker."
              " Latency: sequential `run_wait_result/preview` calls; throughput: a batch submitted at once"
              " (20 in flight), timed until its last completion, repeated; beside the bare interpreter start"
              " (`python3 -c pass`, `bash -c 'echo 1'`) timed in the same run. python3 jobs on process and nsjail"
              " fork from a warm interpreter inside the sandbox (`isolation/README.md`, \"Warm runs\"), bash jobs run in a"
              " clone of a bash that has started (\"Warm bash\"); on docker,"
              " python3 and bash jobs fork in an already running container (\"Warm Docker\"); the"
              " `-cold` rows run the same jobs with `warm: false`, a fresh interpreter (docker: a fresh container) each. \"warm\" is the share"
              " of the run's jobs whose outcome says they ran warm.", "",
              "| backend | language | bare start p50 | latency p50 | latency p95 | overhead p50 | jobs/s median (min-max) | warm | Windmill 1 worker |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in ov["rows"]:
            used = "" if r["backend_used"] == r["backend"] else f" (ran as {r['backend_used']})"
            warm = f"{100 * r['warm_share']:.0f}%" if "warm_share" in r else ""
            L.append(f"| {r['backend']}{used} | {r['language']} | {r['bare']['median']:.1f} ms | {r['latency']['median']:.1f} ms"
                     f" | {r['latency']['p95']:.1f} ms | {r['overhead_ms']:.1f} ms | {r['jps']['median']:.1f}"
                     f" ({r['jps']['min']:.1f}-{r['jps']['max']:.1f}) | {warm} | {WINDMILL[r['language']]:g} jobs/s |")
        skipped = {k: v for k, v in ov["probes"].items() if v}
        for k, v in skipped.items():
            L.append(f"\n{k}: not measured ({v}).")
        L += ["", "![overhead](overhead.png)"]
    sc = res.get("scaling")
    if sc:
        L += ["", "## 2. Scaling", "",
              f"{sc['jobs']} native `sleep` jobs (`{{\"seconds\": 0.1}}`) queued in one transaction, drained by native"
              " worker processes (up to 25 subworkers each), timed from the commit of the queued jobs to the"
              " commit of the last completion, both as PostgreSQL timestamped them (`track_commit_timestamp`;"
              " the harness sees its commit return 6-13 ms later, and its own poll for the end, every 10 ms"
              " from 90% of the ideal time on, is not counted);"
              f" {sc['repeats']} run(s) per point, each on a fresh database.", "",
              "| subworkers | processes | ideal jobs/s | jobs/s median (min-max) | % of ideal |", "|---|---|---|---|---|"]
        for r in sc["rows"]:
            L.append(f"| {r['subworkers']} | {r['processes']} | {r['ideal']:.0f} | {r['jps']['median']:.1f}"
                     f" ({r['jps']['min']:.1f}-{r['jps']['max']:.1f}) | {100 * r['efficiency']['median']:.1f}% |")
        big = sc.get("large", {}).get("rows", [])
        if big:
            lg = sc["large"]
            L += ["", f"The large point(s): {lg['jobs']:,} jobs (the drain's ramp and tail, ~0.1 s each, stay small"
                  f" beside {lg['jobs'] / big[0]['ideal']:.0f} s of ideal), worker processes of"
                  f" {lg['per_process']} subworkers, on a PostgreSQL of their own at **max_connections"
                  f" {lg['max_connections']}** (asserted, and the peak of client backends sampled every 0.25 s"
                  " asserted under it); where the time goes (the median run; psutil CPU of PostgreSQL's processes"
                  " and of the worker processes over the drain; a job's own time as its worker timed it: a 100 ms"
                  " sleep that ends late is the event loop's or the cores' delay; slots busy: the jobs' time over"
                  " the slots' time from the first start to the last completion, the rest is the ramp, the tail"
                  " and waits for claims):", "",
                  "| subworkers | processes | ideal jobs/s | jobs/s median (min-max) | % of ideal | peak backends"
                  " | CPU ms / 1,000 jobs: PostgreSQL, workers | cores used | worker core share | tx/s (a job)"
                  " | a 100 ms job's own ms: mean, p99 | slots busy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in big:
                ld = r["load"]
                L.append(f"| {r['subworkers']} | {r['processes']} | {r['ideal']:.0f} | {r['jps']['median']:.1f}"
                         f" ({r['jps']['min']:.1f}-{r['jps']['max']:.1f}) | {100 * r['efficiency']['median']:.1f}%"
                         f" | {r['peak_backends']} | {ld['pg_cpu_ms_per_1000_jobs']:.0f}, {ld['workers_cpu_ms_per_1000_jobs']:.0f}"
                         f" | {ld['cores_used']:.2f} of {ld['cores']} | {', '.join(f'{x:.2f}' for x in ld['worker_core_share'])}"
                         f" | {ld['tx_per_s']:.0f} ({ld['tx_per_job']:.3f})"
                         f" | {ld.get('job_ms_mean', 0):.1f}, {ld.get('job_ms_p99', 0):.0f}"
                         f" | {100 * ld.get('slot_busy_share', 0):.1f}% |")
        L += ["", "Windmill publishes 981 jobs/s with 100 workers (98.1%).", "", "![scaling](scaling.png)"]
    q = res.get("queue")
    if q:
        L += ["", "## 3. Queue throughput vs pgqueuer", "",
              f"{q['jobs']} no-op jobs queued, then drained; sandmill: native `noop` jobs, one native worker with"
              f" {q['subworkers']} subworkers; pgqueuer {res.get('pgqueuer_version', '')}: the drain strategy of its own"
              " benchmark (5 QueueManager consumers, dequeue batch 10), same PostgreSQL, same run;"
              f" {q['repeats']} run(s) each. Timed: sandmill from the commit of the queued jobs (its workers"
              " wait, idle, beforehand) to the commit of the last completion (PostgreSQL's commit timestamps;"
              " the harness polls every 10 ms to know when to stop, and that poll is not counted); pgqueuer"
              " from its first dequeue (its"
              " consumers' own start, a schema check and LISTEN each, 0.1-0.35 s here, is not counted) to"
              " their exit in drain mode on an empty queue.", "",
              "| queue | jobs/s median (min-max) |", "|---|---|",
              f"| sandmill | {q['sandmill']['median']:.0f} ({q['sandmill']['min']:.0f}-{q['sandmill']['max']:.0f}) |",
              f"| pgqueuer | {q['pgqueuer']['median']:.0f} ({q['pgqueuer']['min']:.0f}-{q['pgqueuer']['max']:.0f}) |",
              f"| ratio | {q['ratio']['median']:.2f}x ({q['ratio']['min']:.2f}-{q['ratio']['max']:.2f}) |",
              "", "![queue](queue.png)"]
    i, rc = res.get("idle"), res.get("recovery")
    if i:
        L += ["", "## 4. Idle load", "",
              f"Server + `profiles/default.yaml` + `profiles/native.yaml` workers, no jobs; `xact_commit` of"
              f" pg_stat_database over {len(i['windows'])} windows of {i['window_s']:g} s: **{i['tx_per_s']:.2f} tx/s**"
              f" (per window min {i['spread']['min']:.2f}, max {i['spread']['max']:.2f})."]
        b = i.get("backends")
        if b:
            L += ["", f"PostgreSQL backends of the idle cluster (pg_stat_activity by application_name): {b['total']} in all,"
                  f" the server {b['server']}, the workers {b['workers']}: **{b['per_worker_process']:g} per worker"
                  " process** (one LISTENs, one runs every statement; target <= 2). By name: "
                  + ", ".join(f"`{k}` {v}" for k, v in sorted(b["by_app"].items())) + "."]
    if rc:
        L += ["", "## 5. Recovery", "",
              f"A native worker is SIGKILLed while its job (a 120 s `sleep`) runs; time until the job runs again on"
              f" another worker, put back by the server's monitor (ping timeout {rc['ping_timeout_s']:g} s, monitor every"
              f" {rc['monitor_every_s']:g} s{', the defaults' if rc['defaults'] else ', shortened for --quick'}):"
              f" {_spread_txt(rc['spread'], 's', '.2f', 'min-max')}. Expected: between ping timeout - 1 s (the last job"
              " ping) and ping timeout + monitor interval."]
    if i or rc:
        L += ["", "![idle and recovery](idle_recovery.png)"]
    L += report_more.markdown(res)  # sections 6-10
    if notes:
        L += ["", "## What holds the missed targets back", ""]
        for k, v in notes.items():
            L += [f"### {k}", "", v, ""]
    L += ["", "Raw samples: `results.json`."]
    return "\n".join(L) + "\n"


def write(res: dict, out: Path, machine: dict, cmd: str, notes: dict[str, str]) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    mline = ", ".join(f"{v}" for k, v in machine.items() if k in ("cpus", "memory", "note"))
    pngs = charts(res, out, mline)
    (out / "report.md").write_text(markdown(res, machine, pngs, cmd, notes))
    (out / "results.json").write_text(json.dumps({"machine": machine, **res}, indent=1, default=str))
    return pngs
