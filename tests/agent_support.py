"""Helpers of the agent workers' tests: make a token, start an agent (a real `sandmill
worker --agent` process with no DATABASE_URL), talk to the agent routes as an agent."""

from __future__ import annotations

import time
import uuid

import httpx

from sandmill.localcluster import LocalCluster

AGENT_PROFILE = """
name: {group}
tags: [{tags}]
backend: {{kind: process}}
subworkers: {subworkers}
limits: {{wall_s: 60, memory_mb: 512, pids: 128}}
"""


def agent_token(c: LocalCluster, group: str, tags: list[str], exp_in_s: float = 3600) -> str:
    with c.client() as api:
        r = api.post("/api/agent_workers/create_agent_token",
                     json={"worker_group": group, "tags": tags, "exp": int(time.time() + exp_in_s)})
    assert r.status_code == 200, r.text
    assert r.text.startswith("jwt_agent_")
    return r.text


def start_agent(c: LocalCluster, token: str, group: str, tags: list[str], subworkers: int = 1,
                url: str | None = None, extra: list[str] = (), env: dict | None = None,
                profile_text: str | None = None):
    prof = c.tmp / f"agent-{group}-{uuid.uuid4().hex[:6]}.yaml"
    prof.write_text(profile_text or AGENT_PROFILE.format(group=group, tags=", ".join(tags), subworkers=subworkers))
    # no database for an agent: DATABASE_URL is emptied
    return c.spawn("worker", "--profile", str(prof), "--agent", "--url", url or c.base, *extra,
                   env={"DATABASE_URL": "", "SANDMILL_AGENT_TOKEN": token, **(env or {})})


def as_agent(c: LocalCluster, token: str, **kw) -> httpx.Client:
    return httpx.Client(base_url=c.base + "/api/agent_workers",
                        headers={"Authorization": f"Bearer {token}"}, timeout=60, **kw)


def agent_name(token: str, base: str = "probe") -> str:
    """A worker name of this token (names end with @<the token's id>)."""
    import jwt
    return f"{base}@{jwt.decode(token[len('jwt_agent_'):], options={'verify_signature': False})['jti'][:12]}"


def push(c: LocalCluster, ws: str, tag: str, code: str = "def main():\n    return 7\n") -> str:
    with c.client() as api:
        r = api.post(f"/api/w/{ws}/jobs/run/preview", json={"content": code, "language": "python3", "tag": tag})
    assert r.status_code == 201, r.text
    return r.text


def wait_agent(c: LocalCluster, tag: str, timeout: float = 30) -> str:
    """The name of a live worker serving ``tag`` (a test's own tag), once one registered."""
    deadline = time.time() + timeout
    with c.client() as api:
        while time.time() < deadline:
            for w in api.get("/api/workers/list").json():
                if tag in w["tags"] and w.get("last_ping_s_ago", 0) < 60:
                    return w["worker"]
            time.sleep(0.1)
    raise RuntimeError(f"no worker of tag {tag} registered: " + c.logs())
