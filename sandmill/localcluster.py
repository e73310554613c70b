"""A sandmill cluster of real processes on this machine (server + workers on a given
database), for tests and benchmarks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx

from .supervisor import SERVER_APP_NAME, stop_children

PROCESS_PROFILE = """
name: {name}
tags: [{tags}]
backend: {{kind: {backend}{backend_options}}}
subworkers: {subworkers}
limits: {{wall_s: 60, memory_mb: 512, pids: 128}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    """Start a server and workers as child processes; ``stop()`` ends them all."""

    def __init__(self, database_url: str, tmp: Path, token: str = "local-admin-token",
                 env: dict[str, str] | None = None):
        self.db_url = database_url
        self.tmp = Path(tmp)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "DATABASE_URL": database_url, "SANDMILL_ADMIN_TOKEN": token,
                    "SANDMILL_DATA_DIR": str(self.tmp / "data"), "PYTHONUNBUFFERED": "1", **(env or {})}

    def spawn(self, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"proc-{len(self.procs)}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "sandmill", *args],
                             env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        return p

    def start_server(self, env: dict | None = None) -> subprocess.Popen:
        p = self.spawn("server", "--port", str(self.port), env={"PGAPPNAME": SERVER_APP_NAME, **(env or {})})
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    return p
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start: " + self.logs())

    def start_worker(self, name: str = "default", tags: str = "python3, bash", subworkers: int = 1,
                     backend: str = "process", profile_text: str | None = None,
                     env: dict | None = None, backend_options: dict | None = None) -> subprocess.Popen:
        opts = "".join(f", {k}: {json.dumps(v)}" for k, v in (backend_options or {}).items())
        text = profile_text or PROCESS_PROFILE.format(name=name, tags=tags, subworkers=subworkers,
                                                      backend=backend, backend_options=opts)
        prof = self.tmp / f"{name}-{uuid.uuid4().hex[:6]}.yaml"
        prof.write_text(text)
        return self.spawn("worker", "--profile", str(prof), env=env)

    def wait_workers(self, group: str, count: int = 1, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        with self.client() as c:
            while time.time() < deadline:
                ws = c.get("/api/workers/list").json()
                if sum(1 for w in ws if w["worker_group"] == group) >= count:
                    return
                time.sleep(0.1)
        raise RuntimeError(f"no {group} worker registered: " + self.logs())

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.token}"},
                            timeout=60, **kw)

    def async_client(self, **kw) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.base, headers={"Authorization": f"Bearer {self.token}"},
                                 timeout=60, **kw)

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.tmp.glob("proc-*.log")))

    def stop(self) -> None:
        """Stop every process as `sandmill up` does (SIGKILL after 15 s), and remove the
        job containers they left."""
        stop_children(self.procs, grace_s=15)
