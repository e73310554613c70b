"""Shared fixtures: a real PostgreSQL per xdist worker (embedded, via pgserver), and a real
sandmill cluster (server + workers as child processes) on it."""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from pathlib import Path

import pytest

from sandmill.store import db as dbmod
from sandmill.localcluster import LocalCluster
from support import TOKEN, recreate_database


@pytest.fixture(scope="session")
def pg_server():
    """One embedded PostgreSQL per xdist worker, deleted at the end."""
    from sandmill.store.embedded import import_pgserver

    pgserver = import_pgserver()

    d = Path(tempfile.mkdtemp(prefix="sandmill-pg-"))
    os.chmod(d, 0o755)
    srv = pgserver.get_server(d / "pg", cleanup_mode="delete")
    yield srv
    srv.cleanup()


@pytest.fixture(scope="session")
def pg_url(pg_server) -> str:
    """A fresh, migrated database for this xdist worker."""
    name = "sandmill_" + os.environ.get("PYTEST_XDIST_WORKER", "main")

    async def setup() -> str:
        url = await recreate_database(pg_server, name)
        await dbmod.migrate_url(url)
        return url

    return asyncio.run(setup())


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
def make_cluster(pg_url, tmp_path):
    """Private clusters (own server, own settings) on this xdist worker's database, or on
    ``db_url``. Their workers serve tags of their own, so they never take other tests' jobs."""
    made: list[LocalCluster] = []

    def make(env: dict | None = None, db_url: str | None = None) -> LocalCluster:
        c = LocalCluster(db_url or pg_url, tmp_path / f"cluster{len(made)}", token=TOKEN, env=env)
        made.append(c)
        c.start_server()
        return c

    yield make
    for c in made:
        c.stop()


@pytest.fixture()
def api(cluster):
    with cluster.client() as c:
        yield c


@pytest.fixture()
def ws() -> str:
    """A workspace of this test's own, so tests never see each other's jobs."""
    return "ws" + uuid.uuid4().hex[:8]
