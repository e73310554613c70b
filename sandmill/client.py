"""The client commands of `sandmill` (run, jobs, workers): they talk to a running server
over HTTP with a bearer token."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"


def add_client_options(p: argparse.ArgumentParser) -> None:
    """The options every client command takes."""
    p.add_argument("--url", default=os.environ.get("SANDMILL_URL", DEFAULT_URL))
    p.add_argument("-w", "--workspace", default="main")


def _client(args: argparse.Namespace) -> httpx.Client:
    token = os.environ.get("SANDMILL_TOKEN") or os.environ.get("SANDMILL_ADMIN_TOKEN")
    if not token:
        f = Path(args.data_dir) / "admin_token"
        if f.exists():
            token = f.read_text().strip()
    if not token:
        print("sandmill: no token: set SANDMILL_TOKEN (the server printed one at its first start)", file=sys.stderr)
        sys.exit(2)
    return httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _check(resp: httpx.Response) -> None:
    if resp.status_code >= 400:
        try:
            msg = resp.json().get("error", resp.text)
        except ValueError:
            msg = resp.text
        print(f"sandmill: {resp.status_code}: {msg}", file=sys.stderr)
        sys.exit(1)


def _parse_kv(pairs: list[str]) -> dict:
    out = {}
    for p in pairs:
        if "=" not in p:
            print(f"sandmill run: -a wants key=value, got {p!r}", file=sys.stderr)
            sys.exit(2)
        k, v = p.split("=", 1)
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def cmd_run(args: argparse.Namespace) -> int:
    """`sandmill run FILE`: submit a .py or .sh file as a job, stream its logs, print its result."""
    path = Path(args.file)
    lang = {".py": "python3", ".sh": "bash"}.get(path.suffix)
    if lang is None:
        print(f"sandmill run: {path}: use a .py (python3) or .sh (bash) file", file=sys.stderr)
        return 2
    try:
        content = path.read_text()
    except OSError as e:
        print(f"sandmill run: {path}: {e.strerror}", file=sys.stderr)
        return 2
    body = {"content": content, "language": lang, "args": _parse_kv(args.arg)}
    params = {"tag": args.tag} if args.tag else {}
    try:
        with _client(args) as c:
            r = c.post(f"/api/w/{args.workspace}/jobs/run/preview", json=body, params=params)
            _check(r)
            job_id = r.text.strip()
            print(f"job {job_id}", file=sys.stderr)
            offset = 0
            while True:
                u = c.get(f"/api/w/{args.workspace}/jobs_u/getupdate/{job_id}", params={"log_offset": offset})
                _check(u)
                d = u.json()
                if d["new_logs"]:
                    sys.stdout.write(d["new_logs"])
                    sys.stdout.flush()
                offset = d["log_offset"]
                if d["completed"]:
                    break
                time.sleep(0.2)
            res = c.get(f"/api/w/{args.workspace}/jobs_u/completed/get_result_maybe/{job_id}").json()
    except httpx.ConnectError:
        print(f"sandmill: cannot reach the server at {args.url} (is `sandmill up` running?)", file=sys.stderr)
        return 2
    print(json.dumps(res["result"], indent=2))
    return 0 if res["success"] else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    """`sandmill jobs`: recent jobs of a workspace."""
    from rich.console import Console
    from rich.table import Table

    with _client(args) as c:
        r = c.get(f"/api/w/{args.workspace}/jobs/list", params={"limit": args.limit})
        _check(r)
    t = Table(title=f"jobs in {args.workspace}")
    for col in ("id", "kind", "script", "lang", "tag", "state", "duration ms", "created"):
        t.add_column(col)
    for j in r.json():
        state = j["status"] or ("running" if j["running"] else "queued")
        t.add_row(j["id"][:8], j["kind"], j["script_path"] or "-", j["language"], j["tag"], state,
                  str(j["duration_ms"] or ""), (j["created_at"] or "")[:19])
    Console().print(t)
    return 0


def _occupancy(w: dict) -> str:
    return "/".join(f"{w.get(k, 0) or 0:.0%}" for k in ("occupancy_15s", "occupancy_5m", "occupancy_30m"))


def _print_autoscaling(args: argparse.Namespace, limit: int = 10) -> None:
    """The autoscaled groups and their latest events (nothing when there are none)."""
    from rich.console import Console
    from rich.table import Table

    with _client(args) as c:
        groups, events = c.get("/api/autoscaling/groups"), c.get("/api/autoscaling/events", params={"limit": limit})
    on = [g for g in groups.json() if g["enabled"]] if groups.status_code == 200 else []
    if not on or events.status_code != 200:
        return
    print("autoscaled groups: " + ", ".join(
        f"{g['worker_group']} ({g['desired'] if g['desired'] is not None else '-'} worker(s) asked)" for g in on))
    t = Table(title="autoscaling events (latest first)")
    for col in ("at", "group", "event", "workers", "reason", "integration", "status"):
        t.add_column(col)
    for e in events.json():
        t.add_row((e["created_at"] or "")[:19], e["worker_group"], e["event_type"],
                  f"{e['from_workers']} -> {e['desired_workers']}", e["reason"], e["integration"], e["status"])
    Console().print(t)


def cmd_workers(args: argparse.Namespace) -> int:
    """`sandmill workers`: the live workers, their tags, backend and occupancy."""
    from rich.console import Console
    from rich.table import Table

    with _client(args) as c:
        r = c.get("/api/workers/list")
        _check(r)
    t = Table(title="workers")
    for col in ("worker", "group", "tags", "backend", "sub", "cpus", "mem MB", "gpus", "ping s ago", "jobs",
                "occupancy 15s/5m/30m"):
        t.add_column(col)
    for w in r.json():
        t.add_row(w["worker"], w["worker_group"], ",".join(w["tags"]), w["backend"], str(w["subworkers"]),
                  str(w["cpus"]), str(w["memory_mb"]), ",".join(w["gpus"]) or "-", str(w["last_ping_s_ago"]),
                  str(w["jobs_done"]), _occupancy(w))
    Console().print(t)
    _print_autoscaling(args)
    for w in r.json():  # why each worker runs its jobs with that backend
        print(f"{w['worker']}: backend {w['backend']}: {w.get('backend_reason') or 'reason not reported'}")
    for w in r.json():  # the scripts a dedicated worker serves
        if w.get("dedicated"):
            print(f"{w['worker']}: dedicated to {', '.join(w['dedicated'])}")
    for w in r.json():  # each GPU a GPU worker hands out, and the job(s) holding it now
        for g in w.get("gpu_jobs") or []:
            print(f"{w['worker']}: GPU {g['index']}{' (' + g['name'] + ')' if g.get('name') else ''}:"
                  f" {', '.join('job ' + j for j in g['jobs']) or 'free'}")
    return 0
