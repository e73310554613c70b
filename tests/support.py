"""Helpers the tests import (kept out of conftest.py: tests/isolation has its own)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx

from sandmill.localcluster import free_port  # noqa: F401 - re-exported for tests

REPO = Path(__file__).resolve().parent.parent

TOKEN = "test-admin-token"

# Wall-clock bounds in tests are multiplied by this: the test VM sets it under software
# emulation (tests/vm/debian12.sh), where a container start alone takes seconds.
SLOWDOWN = float(os.environ.get("SANDMILL_TEST_SLOWDOWN", "1"))


def wait_done(api: httpx.Client, ws: str, job_id: str, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = api.get(f"/api/w/{ws}/jobs_u/get/{job_id}")
        j = r.json()
        if j.get("type") == "CompletedJob":
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not complete in {timeout}s: {j}")


async def recreate_database(pg_server, name: str) -> str:
    """Drop and create database ``name`` on the embedded PostgreSQL ``pg_server``; its URL."""
    from sandmill.store import db as dbmod

    admin = await dbmod.connect(pg_server.get_uri())
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return pg_server.get_uri(name)
