"""Shared fixtures: a real PostgreSQL per xdist worker (embedded, via pgserver), and a real
sandmill cluster (server + workers as child processes) on it."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

from server import db as dbmod

REPO = Path(__file__).resolve().parent.parent
TOKEN = "test-admin-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def write_profile(tmp: Path, name: str, text: str) -> Path:
    p = tmp / f"{name}.yaml"
    p.write_text(text)
    return p


PROCESS_PROFILE = """
name: {name}
tags: [{tags}]
backend: {{kind: process}}
subworkers: {subworkers}
limits: {{wall_s: 60, memory_mb: 512, pids: 128}}
"""


class Cluster:
    """A server and workers started as real processes."""

    def __init__(self, url: str, tmp: Path):
        self.db_url = url
        self.tmp = tmp
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "DATABASE_URL": url, "SANDMILL_ADMIN_TOKEN": TOKEN,
                    "SANDMILL_DATA_DIR": str(tmp / "data"), "PYTHONUNBUFFERED": "1"}

    def spawn(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"proc-{len(self.procs)}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "server.cli", *args], cwd=REPO,
                             env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def start_server(self, env: dict | None = None) -> None:
        self.spawn("server", "--port", str(self.port), env=env)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start: " + self.logs())

    def start_worker(self, name: str = "default", tags: str = "python3, bash", subworkers: int = 1,
                     profile_text: str | None = None, env: dict | None = None) -> subprocess.Popen:
        text = profile_text or PROCESS_PROFILE.format(name=name, tags=tags, subworkers=subworkers)
        prof = write_profile(self.tmp, f"{name}-{uuid.uuid4().hex[:6]}", text)
        return self.spawn("worker", "--profile", str(prof), env=env)

    def wait_workers(self, group: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            ws = self.client().get("/api/workers/list").json()
            if sum(1 for w in ws if w["worker_group"] == group) >= count:
                return
            time.sleep(0.1)
        raise RuntimeError(f"no {group} worker registered: " + self.logs())

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp.glob("proc-*.log")))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


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
