"""The embedded PostgreSQL (the `pgserver` package) that `sandmill up`, `sandmill server`
without DATABASE_URL, the tests and the benchmarks start in a data dir."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import platformdirs

LOG_NAME = "pgserver.log"  # in the data dir: initdb's and pg_ctl's output


def default_data_dir() -> Path:
    """The data dir when none is given: SANDMILL_DATA_DIR, else the user's data dir."""
    env = os.environ.get("SANDMILL_DATA_DIR")
    return Path(env) if env else Path(platformdirs.user_data_dir("sandmill"))


def import_pgserver():
    """The pgserver module, imported here (its import is slow and only some commands need
    it) and quietly: where XDG_RUNTIME_DIR is unset (root, services, CI) the import warns
    through platformdirs, and its fallback is fine for pgserver."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver
    return pgserver


def quiet_pgserver(log_file: Path, verbose: bool = False) -> None:
    """Send pgserver's INFO lines (initdb's whole output, pg_ctl command lines) to
    ``log_file`` instead of the console; ``verbose`` also keeps them on the console."""
    logger = logging.getLogger("pgserver")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    if not any(getattr(h, "baseFilename", None) == str(log_file.resolve()) for h in logger.handlers):
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = verbose


def start_embedded(data_dir: Path, keep_running: bool = False, verbose: bool = False):
    """Start (or join) the embedded PostgreSQL in ``data_dir/pg``; returns the pgserver
    handle. Its chatter goes to ``data_dir/pgserver.log`` (and the console if ``verbose``).
    The server stops when the last handle in this process goes away, unless
    ``keep_running``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    quiet_pgserver(data_dir / LOG_NAME, verbose)
    pgserver = import_pgserver()
    return pgserver.get_server(data_dir / "pg", cleanup_mode=None if keep_running else "stop")


def embedded_url(server) -> str:
    """asyncpg-ready URL of a pgserver handle (it listens on a Unix socket only)."""
    return server.get_uri()
