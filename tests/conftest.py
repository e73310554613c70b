"""Shared fixtures: a real PostgreSQL per xdist worker (embedded, via pgserver), and a real
sandmill cluster (server + workers as child processes) on it."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from server import db as dbmod
from server.localcluster import REPO, LocalCluster, free_port  # noqa: F401 - re-exported for tests
TOKEN = "test-admin-token"


@pytest.fixture(scope="session")
def pg_server():
    """One embedded PostgreSQL per xdist worker, deleted at the end."""
    import pgserver

    d = Path(tempfile.mkdtemp(prefix="sandmill-pg-"))
    os.chmod(d, 0o755)
    srv = pgserver.get_server(d / "pg", cleanup_mode="delete")
    yield srv
    srv.cleanup()


@pytest.fixture(scope="session")
def pg_url(pg_server) -> str:
    """A fresh, migrated database for this xdist worker."""
    name = "sandmill_" + os.environ.get("PYTEST_XDIST_WORKER", "main")

    async def setup() -> None:
        admin = await dbmod.connect(pg_server.get_uri())
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.close()
        conn = await dbmod.connect(pg_server.get_uri(name))
        await dbmod.migrate(conn)
        await conn.close()

    asyncio.run(setup())
    return pg_server.get_uri(name)


class Cluster(LocalCluster):
    """The tests' cluster: the admin token is TOKEN."""

    def __init__(self, url: str, tmp: Path):
        super().__init__(url, tmp, token=TOKEN)


@pytest.fixture(scope="session")
def cluster(pg_url, tmp_path_factory):
    """Server + a default-like worker (process backend, tags python3/bash) + a native worker."""
    c = Cluster(pg_url, tmp_path_factory.mktemp("cluster"))
    try:
        c.start_server()
        c.start_worker("default", subworkers=2)
        c.start_worker(profile_text="name: native\ntags: [postgresql, http, native]\nnative: true\nsubworkers: 8\n")
        c.wait_workers("default")
        c.wait_workers("native")
        yield c
    finally:
        c.stop()


@pytest.fixture()
def api(cluster):
    with cluster.client() as c:
        yield c


@pytest.fixture()
def ws() -> str:
    """A workspace of this test's own, so tests never see each other's jobs."""
    return "ws" + uuid.uuid4().hex[:8]


def wait_done(api: httpx.Client, ws: str, job_id: str, timeout: float = 30) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        r = api.get(f"/api/w/{ws}/jobs_u/get/{job_id}")
        j = r.json()
        if j.get("type") == "CompletedJob":
            return j
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not complete in {timeout}s: {j}")
