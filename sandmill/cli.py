"""The `sandmill` command: up, server, worker, run, jobs, workers, profiles check."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sandmill.profiles import shipped
from sandmill.store.db import default_data_dir

DEFAULT_URL = "http://127.0.0.1:8000"


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _database_url(args: argparse.Namespace, keep_running: bool = False):
    """(url, pgserver handle or None): DATABASE_URL / --database-url, else embedded."""
    url = getattr(args, "database_url", None) or os.environ.get("DATABASE_URL")
    if url:
        return url, None
    from sandmill.store.db import embedded_url, start_embedded

    srv = start_embedded(Path(args.data_dir), keep_running=keep_running)
    return embedded_url(srv), srv


# ---- server & worker --------------------------------------------------------------------

def cmd_server(args: argparse.Namespace) -> int:
    import uvicorn

    from sandmill.server.api import create_app
    from sandmill.server.settings import ServerSettings, admin_token

    _setup_logging(args.verbose)
    url, _srv = _database_url(args)
    data_dir = Path(args.data_dir)
    settings = ServerSettings(database_url=url, data_dir=data_dir, admin_token=admin_token(data_dir))
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning",
                access_log=False)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from sandmill.worker.loop import run_worker
    from sandmill.profiles import ProfileError, load_profile

    _setup_logging(args.verbose)
    try:
        profile = load_profile(args.profile)
    except ProfileError as e:
        print(f"sandmill worker: invalid profile\n{e}", file=sys.stderr)
        return 2
    url = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        print("sandmill worker: set DATABASE_URL (or --database-url): the queue's PostgreSQL", file=sys.stderr)
        return 2
    settings = None
    if args.allow_no_gpu:
        from sandmill.worker.loop import WorkerSettings

        settings = WorkerSettings(allow_no_gpu=True)
    return run_worker(profile, url, settings)


def cmd_up(args: argparse.Namespace) -> int:
    from .supervisor import run_up

    _setup_logging(args.verbose)
    return run_up(args)


# ---- client commands --------------------------------------------------------------------

def _client(args: argparse.Namespace):
    import httpx

    token = os.environ.get("SANDMILL_TOKEN") or os.environ.get("SANDMILL_ADMIN_TOKEN")
    if not token:
        f = Path(args.data_dir) / "admin_token"
        if f.exists():
            token = f.read_text().strip()
    if not token:
        print("sandmill: no token: set SANDMILL_TOKEN (the server printed one at its first start)", file=sys.stderr)
        sys.exit(2)
    return httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _check(resp) -> None:
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
    import time

    import httpx

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


def cmd_workers(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _client(args) as c:
        r = c.get("/api/workers/list")
        _check(r)
    t = Table(title="workers")
    for col in ("worker", "group", "tags", "backend", "sub", "cpus", "mem MB", "gpus", "ping s ago", "jobs", "occupancy"):
        t.add_column(col)
    for w in r.json():
        t.add_row(w["worker"], w["worker_group"], ",".join(w["tags"]), w["backend"], str(w["subworkers"]),
                  str(w["cpus"]), str(w["memory_mb"]), ",".join(w["gpus"]) or "-", str(w["last_ping_s_ago"]),
                  str(w["jobs_done"]), f"{w['occupancy']:.0%}")
    Console().print(t)
    return 0


def cmd_profiles_check(args: argparse.Namespace) -> int:
    from sandmill.profiles import ProfileError, load_profile

    bad = 0
    for f in args.files:
        try:
            p = load_profile(f)
            print(f"{f}: ok (group {p.name}, tags {', '.join(p.tags)}, backend {p.backend.kind})")
        except ProfileError as e:
            print(e, file=sys.stderr)
            bad += 1
    return 1 if bad else 0


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    """`sandmill bench ...` is `python -m bench ...` (needs the repository checkout)."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "bench" / "__main__.py").exists() and str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        from bench.__main__ import main as bench_main
    except ImportError:
        print("sandmill bench: the benchmarks live in the repository's bench/ folder; run it"
              " from a checkout (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    return bench_main(rest) or 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=str(default_data_dir()),
                        help="where the embedded PostgreSQL and the admin token live (default: %(default)s)")
    common.add_argument("-v", "--verbose", action="store_true")
    ap = argparse.ArgumentParser(prog="sandmill", description="Sandboxed job execution runtime.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add(*a, parents=[common], **kw)  # every command takes them

    up = sub.add_parser("up", help="embedded PostgreSQL + server + default and native workers")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--database-url", default=None)
    up.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="default-group workers (default: cores)")
    up.add_argument("--profile", action="append", default=None,
                    help="profiles to start (default: profiles/default.yaml and profiles/native.yaml)")
    up.set_defaults(fn=cmd_up)

    sv = sub.add_parser("server", help="the HTTP API and the monitor")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--database-url", default=None)
    sv.set_defaults(fn=cmd_server)

    wk = sub.add_parser("worker", help="one worker of a group")
    wk.add_argument("--profile", default=str(shipped("default")))
    wk.add_argument("--database-url", default=None)
    wk.add_argument("--allow-no-gpu", action="store_true",
                    help="start a requires_gpu group even where no GPU is found")
    wk.set_defaults(fn=cmd_worker)

    for name, fn, hlp in (("run", cmd_run, "run a .py or .sh file as a job and print its result"),
                          ("jobs", cmd_jobs, "recent jobs"), ("workers", cmd_workers, "live workers")):
        p = sub.add_parser(name, help=hlp)
        p.add_argument("--url", default=os.environ.get("SANDMILL_URL", DEFAULT_URL))
        p.add_argument("-w", "--workspace", default="main")
        if name == "run":
            p.add_argument("file")
            p.add_argument("-a", "--arg", action="append", default=[], metavar="KEY=VALUE")
            p.add_argument("--tag")
        if name == "jobs":
            p.add_argument("--limit", type=int, default=20)
        p.set_defaults(fn=fn)

    bn = sub.add_parser("bench", help="run the benchmark set and write a report (python -m bench)",
                        add_help=False)
    bn.set_defaults(fn=cmd_bench)

    pr = sub.add_parser("profiles", help="worker group profiles")
    prs = pr.add_subparsers(dest="pcmd", required=True)
    chk = prs.add_parser("check", help="validate profile files", parents=[common])
    chk.add_argument("files", nargs="+")
    chk.set_defaults(fn=cmd_profiles_check)
    return ap


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if args.fn is cmd_bench:
        return cmd_bench(args, rest)
    if rest:
        build_parser().parse_args(argv)  # reports the unknown arguments and exits 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
