"""The `sandmill` command: up, server, worker, profiles check, and the client commands
(run, jobs, workers). The only module, with the supervisor, that imports both the server
and the worker."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from sandmill.profiles import shipped, shipped_names
from sandmill.store.embedded import default_data_dir

from . import agent_cli, client, tokens_cli


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _database_url(args: argparse.Namespace):
    """(url, pgserver handle or None): DATABASE_URL / --database-url, else embedded."""
    url = getattr(args, "database_url", None) or os.environ.get("DATABASE_URL")
    if url:
        return url, None
    from sandmill.store.embedded import embedded_url, start_embedded

    srv = start_embedded(Path(args.data_dir), verbose=args.verbose)
    return embedded_url(srv), srv


def cmd_server(args: argparse.Namespace) -> int:
    """`sandmill server`: the HTTP API and the monitor."""
    import uvicorn

    from sandmill.server.app import create_app
    from sandmill.server.settings import ServerSettings, admin_token

    _setup_logging(args.verbose)
    url, _srv = _database_url(args)
    data_dir = Path(args.data_dir)
    settings = ServerSettings(database_url=url, data_dir=data_dir, admin_token=admin_token(data_dir))
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning",
                access_log=False, timeout_keep_alive=settings.keep_alive_s, **agent_cli.tls_kwargs(args))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """`sandmill worker --profile FILE`: one worker of a group."""
    from sandmill.profiles import ProfileError, load_profile, resolve
    from sandmill.worker.main import run_worker
    from sandmill.worker.settings import WorkerSettings

    _setup_logging(args.verbose)
    try:
        profile = load_profile(resolve(args.profile))
    except ProfileError as e:
        print(f"sandmill worker: invalid profile\n{e}", file=sys.stderr)
        return 2
    if args.agent:  # over HTTP(S) with an agent token, no database
        return agent_cli.run_agent_worker(args, profile, WorkerSettings(allow_no_gpu=True) if args.allow_no_gpu else None)
    url = args.database_url or os.environ.get("DATABASE_URL")
    if not url:
        print("sandmill worker: set DATABASE_URL (or --database-url): the queue's PostgreSQL", file=sys.stderr)
        return 2
    settings = WorkerSettings(allow_no_gpu=True) if args.allow_no_gpu else None
    return run_worker(profile, url, settings)


def cmd_up(args: argparse.Namespace) -> int:
    """`sandmill up`: embedded PostgreSQL, the server and the default and native groups."""
    from .supervisor import run_up

    _setup_logging(args.verbose)
    return run_up(args)


def cmd_profiles_check(args: argparse.Namespace) -> int:
    """`sandmill profiles check [FILE...]`: validate profiles (the shipped ones when no file
    is given); exit 1 if any is bad."""
    from sandmill.profiles import ProfileError, load_profile

    bad = 0
    for f in args.files or [str(shipped(n)) for n in shipped_names()]:
        try:
            p = load_profile(f)
            serves = f"dedicated to {', '.join(p.dedicated)}" if p.dedicated else f"tags {', '.join(p.tags)}"
            print(f"{f}: ok (group {p.name}, {serves}, backend {p.backend.kind})")
        except ProfileError as e:
            print(e, file=sys.stderr)
            bad += 1
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=str(default_data_dir()),
                        help="where the embedded PostgreSQL and the admin token live (default: %(default)s)")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the embedded PostgreSQL's own lines")
    ap = argparse.ArgumentParser(prog="sandmill", description="Sandboxed job execution runtime.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def command(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, parents=[common])
        p.set_defaults(fn=fn)
        return p

    up = command("up", cmd_up, "embedded PostgreSQL + server + default and native workers")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--database-url", default=None)
    up.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="default-group workers (default: cores)")
    up.add_argument("--profile", action="append", default=None,
                    help="profiles to start, files or shipped names (default: default and native)")
    agent_cli.add_tls_options(up)

    sv = command("server", cmd_server, "the HTTP API and the monitor")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--database-url", default=None)
    agent_cli.add_tls_options(sv)

    wk = command("worker", cmd_worker, "one worker of a group")
    wk.add_argument("--profile", default="default",
                    help="the group's profile: a YAML file, or the name of a shipped profile"
                         f" ({', '.join(shipped_names())}; default: %(default)s)")
    wk.add_argument("--database-url", default=None)
    wk.add_argument("--allow-no-gpu", action="store_true",
                    help="start a requires_gpu group even where no GPU is found")
    agent_cli.add_worker_options(wk)

    run = command("run", client.cmd_run, "run a .py or .sh file as a job and print its result")
    run.add_argument("file")
    run.add_argument("-a", "--arg", action="append", default=[], metavar="KEY=VALUE")
    run.add_argument("--tag")
    jobs = command("jobs", client.cmd_jobs, "recent jobs")
    jobs.add_argument("--limit", type=int, default=20)
    workers = command("workers", client.cmd_workers, "live workers")
    for p in (run, jobs, workers):
        client.add_client_options(p)

    tokens_cli.add_commands(sub, common)
    agent_cli.add_commands(sub, common)

    pr = sub.add_parser("profiles", help="worker group profiles")
    prs = pr.add_subparsers(dest="pcmd", required=True)
    chk = prs.add_parser("check", help="validate profile files (default: the shipped profiles)",
                         parents=[common])
    chk.add_argument("files", nargs="*")
    chk.set_defaults(fn=cmd_profiles_check)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `sandmill` command."""
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
