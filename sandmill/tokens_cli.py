"""`sandmill tokens create|list|revoke`: workspace tokens, through the server's HTTP API
with the admin token (as the other client commands: SANDMILL_TOKEN, SANDMILL_ADMIN_TOKEN
or the data dir's admin_token)."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import sys

from .client import DEFAULT_URL, _check, _client

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expires(text: str) -> dt.datetime | None:
    """'30d', '12h', '45m', '90s', '2w' -> that long from now (UTC); 'never' -> None.
    Raises ValueError with the accepted forms."""
    if text == "never":
        return None
    m = re.fullmatch(r"(\d+)([smhdw])", text.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"--expires {text!r}: use a positive number and a unit"
                         " (s, m, h, d, w: e.g. 30d, 12h) or 'never'")
    return dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def cmd_create(args: argparse.Namespace) -> int:
    """`sandmill tokens create --workspace W`: print a new token (shown this once)."""
    try:
        expires = parse_expires(args.expires)
    except ValueError as e:
        print(f"sandmill tokens create: {e}", file=sys.stderr)
        return 2
    body = {"label": args.label, "workspace_id": args.workspace,
            "expiration": expires.isoformat() if expires else None,
            "scopes": [s.strip() for s in args.scopes.split(",") if s.strip()] if args.scopes else None}
    with _client(args) as c:
        r = c.post("/api/users/tokens/create", json=body)
        _check(r)
    print(r.text.strip())
    print(f"(token for workspace {args.workspace}; it is shown only now: only its hash is kept)",
          file=sys.stderr)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """`sandmill tokens list [--workspace W]`: the tokens, never their secrets."""
    from rich.console import Console
    from rich.table import Table

    params = {"workspace_id": args.workspace} if args.workspace else {}
    with _client(args) as c:
        r = c.get("/api/users/tokens/list", params=params)
        _check(r)
    t = Table(title="tokens")
    for col in ("prefix", "label", "workspace", "scopes", "created", "expires", "last used"):
        t.add_column(col)
    for k in r.json():
        exp = (k["expiration"] or "never")[:19] + (" (expired)" if k["expired"] else "")
        t.add_row(k["prefix"], k["label"], k["workspace_id"], ",".join(k["scopes"]),
                  k["created_at"][:19], exp, (k["last_used_at"] or "-")[:19])
    Console(width=200).print(t)
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    """`sandmill tokens revoke PREFIX`: delete a token; refused from its next request on."""
    with _client(args) as c:
        r = c.delete(f"/api/users/tokens/delete/{args.prefix}")
        _check(r)
    print(r.text)
    return 0


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register `sandmill tokens ...` on the command's subparsers."""
    tk = sub.add_parser("tokens", help="workspace tokens (create, list, revoke)")
    tks = tk.add_subparsers(dest="tcmd", required=True)

    def command(name: str, fn, help: str) -> argparse.ArgumentParser:
        p = tks.add_parser(name, help=help, parents=[common])
        p.add_argument("--url", default=os.environ.get("SANDMILL_URL", DEFAULT_URL))
        p.set_defaults(fn=fn)
        return p

    cr = command("create", cmd_create, "a token for one workspace (printed once)")
    cr.add_argument("-w", "--workspace", required=True)
    cr.add_argument("--scopes", default=None,
                    help="comma-separated, e.g. jobs:run,jobs:read (default: every workspace scope)")
    cr.add_argument("--expires", default="never", help="e.g. 30d, 12h, 45m (default: never)")
    cr.add_argument("--label", default="token")
    ls = command("list", cmd_list, "the tokens (never their secrets)")
    ls.add_argument("-w", "--workspace", default=None, help="only this workspace's")
    rv = command("revoke", cmd_revoke, "delete a token by its prefix")
    rv.add_argument("prefix")
