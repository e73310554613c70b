"""Agent workers on the command line: `sandmill agent-token create|revoke` (through the
server's HTTP API with the admin token, as `sandmill tokens`), `sandmill worker --agent
--url URL` (the token in SANDMILL_AGENT_TOKEN), and the TLS options of `sandmill server`
and `sandmill up` (uvicorn's own)."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import httpx

from .client import DEFAULT_URL, _check, _client
from .tokens_cli import parse_expires


def _admin(args: argparse.Namespace) -> httpx.Client:
    """The admin's client (as `sandmill tokens`), verifying an HTTPS server with --ca-file."""
    c = _client(args)
    if not args.ca_file:
        return c
    headers = dict(c.headers)
    c.close()
    return httpx.Client(base_url=args.url, headers=headers, timeout=30,
                        verify=ssl.create_default_context(cafile=args.ca_file))


def cmd_create(args: argparse.Namespace) -> int:
    """`sandmill agent-token create --group G --tags a,b --expires 30d`: print a new token."""
    try:
        expires = parse_expires(args.expires)
    except ValueError as e:
        print(f"sandmill agent-token create: {e}", file=sys.stderr)
        return 2
    if expires is None:
        print("sandmill agent-token create: an agent token expires: give --expires (e.g. 30d, 365d)",
              file=sys.stderr)
        return 2
    tags = [t.strip() for t in args.tags.split(",") if t.strip()]
    with _admin(args) as c:
        r = c.post("/api/agent_workers/create_agent_token",
                   json={"worker_group": args.group, "tags": tags, "exp": int(expires.timestamp())})
        _check(r)
    print(r.text.strip())
    print(f"(agent token for group {args.group}, tags {','.join(tags)}, until {expires:%Y-%m-%d %H:%M}"
          " UTC: run `SANDMILL_AGENT_TOKEN=... sandmill worker --agent --url URL --profile P`)",
          file=sys.stderr)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """`sandmill agent-token revoke TOKEN`: refused by every server within seconds."""
    token = args.token if args.token != "-" else sys.stdin.read().strip()
    with _admin(args) as c:
        r = c.post("/api/agent_workers/blacklist_token", json={"token": token})
        _check(r)
    print(r.text)
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register `sandmill agent-token ...` on the command's subparsers."""
    at = sub.add_parser("agent-token", help="tokens of agent workers (create, revoke)")
    ats = at.add_subparsers(dest="acmd", required=True)

    def command(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = ats.add_parser(name, help=help, parents=[common])
        p.add_argument("--url", default=os.environ.get("SANDMILL_URL", DEFAULT_URL))
        p.add_argument("--ca-file", default=os.environ.get("SANDMILL_CA_FILE"),
                       help="CA certificate to verify an HTTPS server with (self-signed setups)")
        p.set_defaults(fn=fn)
        return p

    cr = command("create", cmd_create, "a token for the agent workers of one group (printed once)")
    cr.add_argument("--group", required=True, help="the worker group (the profile's name)")
    cr.add_argument("--tags", required=True, help="comma-separated: the tags its agents serve")
    cr.add_argument("--expires", default="365d", help="e.g. 30d, 12h (default: %(default)s)")
    rv = command("revoke", cmd_revoke, "revoke an agent token (the token itself, or - for stdin)")
    rv.add_argument("token")


def add_worker_options(wk: argparse.ArgumentParser) -> None:
    """`sandmill worker --agent --url URL [--ca-file F]`."""
    wk.add_argument("--agent", action="store_true",
                    help="an agent worker: reach the server over HTTP(S) with the token in"
                         " SANDMILL_AGENT_TOKEN, no database connection")
    wk.add_argument("--url", default=os.environ.get("SANDMILL_URL"),
                    help="the server's URL, for --agent (or SANDMILL_URL)")
    wk.add_argument("--ca-file", default=os.environ.get("SANDMILL_CA_FILE"),
                    help="CA certificate to verify the server's with (self-signed setups)")


def run_agent_worker(args: argparse.Namespace, profile: Any, settings: Any) -> int:
    """`sandmill worker --agent`: checks its options, then runs the agent worker."""
    from sandmill.worker.agent_worker import run_agent

    token = os.environ.get("SANDMILL_AGENT_TOKEN", "").strip()
    if not token:
        print("sandmill worker --agent: set SANDMILL_AGENT_TOKEN (sandmill agent-token create)", file=sys.stderr)
        return 2
    if not args.url:
        print("sandmill worker --agent: give --url (or SANDMILL_URL): the server's", file=sys.stderr)
        return 2
    if args.ca_file and not Path(args.ca_file).is_file():
        print(f"sandmill worker --agent: --ca-file {args.ca_file}: no such file", file=sys.stderr)
        return 2
    return run_agent(profile, args.url, token, data_dir=Path(args.data_dir), ca_file=args.ca_file,
                     settings=settings)


def add_tls_options(p: argparse.ArgumentParser) -> None:
    """`--ssl-certfile/--ssl-keyfile` of `sandmill server` and `up`: serve HTTPS."""
    p.add_argument("--ssl-certfile", default=os.environ.get("SANDMILL_SSL_CERTFILE"),
                   help="serve HTTPS with this certificate (PEM; with --ssl-keyfile)")
    p.add_argument("--ssl-keyfile", default=os.environ.get("SANDMILL_SSL_KEYFILE"),
                   help="the certificate's private key (PEM)")


def tls_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """uvicorn's TLS options from the command line; SystemExit naming a missing file."""
    cert, key = getattr(args, "ssl_certfile", None), getattr(args, "ssl_keyfile", None)
    if not cert and not key:
        return {}
    if not (cert and key):
        raise SystemExit("sandmill: --ssl-certfile and --ssl-keyfile go together")
    for opt, f in (("--ssl-certfile", cert), ("--ssl-keyfile", key)):
        if not Path(f).is_file():
            raise SystemExit(f"sandmill: {opt} {f}: no such file")
    return {"ssl_certfile": cert, "ssl_keyfile": key}


def tls_argv(args: argparse.Namespace) -> list[str]:
    """The same options, for the server that `sandmill up` starts."""
    kw = tls_kwargs(args)
    return ["--ssl-certfile", kw["ssl_certfile"], "--ssl-keyfile", kw["ssl_keyfile"]] if kw else []
