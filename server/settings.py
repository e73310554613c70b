"""Server settings, from the command line and the environment (SANDMILL_*)."""

from __future__ import annotations

import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sandmill.store.embedded import default_data_dir


@dataclass
class ServerSettings:
    database_url: str
    data_dir: Path = field(default_factory=default_data_dir)
    admin_token: str = ""
    ping_timeout_s: float = float(os.environ.get("SANDMILL_PING_TIMEOUT_S", 6))
    # how many dead workers a job survives: it runs again after each of the first
    # max_restarts deaths of its worker, and fails (WorkerDied) at the next one
    max_restarts: int = int(os.environ.get("SANDMILL_MAX_RESTARTS", 1))
    monitor_every_s: float = float(os.environ.get("SANDMILL_MONITOR_EVERY_S", 2))
    wait_timeout_s: float = float(os.environ.get("SANDMILL_WAIT_TIMEOUT_S", 60))
    # an idle kept-alive HTTP connection stays open this long: longer than clients keep
    # theirs (httpx and others: 5 s), or a request sent as the server closes one is lost
    keep_alive_s: float = float(os.environ.get("SANDMILL_KEEP_ALIVE_S", 75))


def admin_token(data_dir: Path) -> str:
    """SANDMILL_ADMIN_TOKEN, else the token stored in the data dir, else a new one
    (printed once to stderr and written to the data dir, mode 0600)."""
    env = os.environ.get("SANDMILL_ADMIN_TOKEN")
    if env:
        return env
    path = data_dir / "admin_token"
    if path.exists():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    print(f"sandmill: generated admin token (saved to {path}):\n  {token}", file=sys.stderr)
    return token
