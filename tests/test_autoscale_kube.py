"""The kubernetes integration with the official client, against an in-process stand-in of
the API server's pod, pod-patch and Deployment scale endpoints (no Kubernetes API server
runs here): the requests it sends, in order."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from sandmill.profiles.autoscaling import KubernetesIntegration
from sandmill.server.autoscale.kube import DELETION_COST, scale
from sandmill.store import db as dbmod
from sandmill.store import queue, workers
from test_autoscale import events, own_db, push, wait_for, write_profile, FAST  # noqa: F401 (fixture)


class StandIn:
    """Answers what the client asks and records each request."""

    def __init__(self, pods: list[str]):
        self.requests: list[dict] = []
        self.pods = pods
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, obj: dict, code: int = 200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _record(self):
                n = int(self.headers.get("Content-Length") or 0)
                u = urlparse(self.path)
                outer.requests.append({"method": self.command, "path": u.path, "query": parse_qs(u.query),
                                       "body": json.loads(self.rfile.read(n) or b"null"),
                                       "content_type": self.headers.get("Content-Type"),
                                       "auth": self.headers.get("Authorization")})
                return u.path

            def do_GET(self):
                path = self._record()
                if path.endswith("/pods"):
                    return self._answer({"kind": "PodList", "apiVersion": "v1", "metadata": {},
                                         "items": [{"metadata": {"name": p}} for p in outer.pods]})
                self._answer({"kind": "Status", "code": 404}, 404)

            def do_PATCH(self):
                path = self._record()
                name = path.split("/")[-2 if path.endswith("/scale") else -1]
                if path.endswith("/scale"):
                    return self._answer({"kind": "Scale", "apiVersion": "autoscaling/v1", "metadata": {"name": name},
                                         "spec": outer.requests[-1]["body"]["spec"]})
                self._answer({"kind": "Pod", "apiVersion": "v1", "metadata": {"name": name}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, tmp, namespace: str = "sandmill") -> str:
        p = tmp / "kubeconfig"
        p.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "ctx",
            "clusters": [{"name": "c", "cluster": {"server": self.url}}],
            "users": [{"name": "u", "user": {"token": "standin-token"}}],
            "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u", "namespace": namespace}}]}))
        return str(p)


@pytest.fixture()
def standin():
    s = StandIn(["pod-busy", "pod-idle", "pod-new"])
    yield s
    s.server.shutdown()


def test_scale_in_sets_deletion_costs_before_the_replicas(standin, own_db, tmp_path):
    async def go():
        pool = await dbmod.create_pool(own_db)
        try:  # two registered workers: pod-busy's runs a job; pod-new has not registered yet
            for host in ("pod-busy", "pod-idle"):
                await workers.register(pool, name=f"g-{host}-1-abcd", group="g", hostname=host, tags=["gt"],
                                       backend="process", subworkers=2, info={})
            await queue.push(pool, workspace="w", language="sleep", content="", args={}, tag="gt")
            assert await queue.pull(pool, "g-pod-busy-1-abcd", ["gt"])
            integ = KubernetesIntegration(type="kubernetes", kubeconfig=standin.kubeconfig(tmp_path))
            return await scale(integ, "g", 1, 3, pool)
        finally:
            await pool.close()

    out = asyncio.run(go())
    reqs = standin.requests
    assert [(r["method"], r["path"]) for r in reqs] == [
        ("GET", "/api/v1/namespaces/sandmill/pods"),  # the kubeconfig context's namespace
        ("PATCH", "/api/v1/namespaces/sandmill/pods/pod-busy"),
        ("PATCH", "/api/v1/namespaces/sandmill/pods/pod-idle"),
        ("PATCH", "/api/v1/namespaces/sandmill/pods/pod-new"),
        ("PATCH", "/apis/apps/v1/namespaces/sandmill/deployments/sandmill-worker-g/scale"),
    ]
    assert reqs[0]["query"]["labelSelector"] == ["sandmill.dev/group=g"]
    costs = {r["path"].rsplit("/", 1)[1]: r["body"]["metadata"]["annotations"][DELETION_COST] for r in reqs[1:4]}
    assert costs == {"pod-busy": "100", "pod-idle": "0", "pod-new": "0"}  # idle pods go first
    assert reqs[4]["body"] == {"spec": {"replicas": 1}}
    assert all(r["auth"] == "Bearer standin-token" for r in reqs)
    assert "deployment sandmill/sandmill-worker-g: replicas 3 -> 1" in out


def test_the_autoscaler_scales_a_deployment_out(standin, make_cluster, own_db, tmp_path):
    tag = "k8s-" + uuid.uuid4().hex[:6]
    prof = write_profile(tmp_path, "kube", tag, min_workers=0, max_workers=3,
                         integration={"type": "kubernetes", "namespace": "prod", "deployment": "kube-workers",
                                      "kubeconfig": standin.kubeconfig(tmp_path)})
    c = make_cluster(env={**FAST, "SANDMILL_PROFILES": str(prof)}, db_url=own_db)
    push(own_db, tag, 10)  # more than max: a full scale-out, no pod touched
    ev = wait_for(lambda: events(c, "kube"), 15, "the event")
    assert (ev[0]["event_type"], ev[0]["status"], ev[0]["desired_workers"]) == ("full_scale_out", "applied", 3)
    assert [(r["method"], r["path"], r["body"]) for r in standin.requests] == [
        ("PATCH", "/apis/apps/v1/namespaces/prod/deployments/kube-workers/scale", {"spec": {"replicas": 3}})]
    assert "replicas 0 -> 3" in ev[0]["output"]


def test_an_unreachable_api_server_is_a_failed_event(make_cluster, own_db, tmp_path):
    tag = "k8s-" + uuid.uuid4().hex[:6]
    cfg = tmp_path / "kc"
    cfg.write_text(json.dumps({"apiVersion": "v1", "kind": "Config", "current-context": "x",
                               "clusters": [{"name": "c", "cluster": {"server": "http://127.0.0.1:9"}}],
                               "users": [{"name": "u", "user": {}}],
                               "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}]}))
    prof = write_profile(tmp_path, "kfail", tag, min_workers=0, max_workers=2,
                         integration={"type": "kubernetes", "kubeconfig": str(cfg)})
    c = make_cluster(env={**FAST, "SANDMILL_PROFILES": str(prof)}, db_url=own_db)
    push(own_db, tag, 1)
    ev = wait_for(lambda: events(c, "kfail"), 60, "the failed event")
    assert ev[0]["status"].startswith("failed: ") and ev[0]["integration"] == "kubernetes"
    with c.client() as api:  # not recorded: the next check tries again
        assert [g["desired"] for g in api.get("/api/autoscaling/groups").json()] == [None]
