"""The ``kubernetes`` integration, through the official client: set each of the group's
pods' ``controller.kubernetes.io/pod-deletion-cost`` (0 for an idle pod, higher for a busy
one) before a scale-in, so the ReplicaSet deletes idle pods first; then patch the
Deployment's scale to the count asked for. Configuration: in-cluster (the pod's service
account, found by the client) when there, else the kubeconfig."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sandmill.profiles.autoscaling import KubernetesIntegration
from sandmill.store import autoscale as store
from sandmill.store import workers

DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
_NS_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def api_client(integ: KubernetesIntegration) -> Any:
    """An ApiClient: in-cluster config when the pod's service account is mounted, else the
    kubeconfig (``integ.kubeconfig``, else KUBECONFIG / ~/.kube/config)."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(config_file=integ.kubeconfig, client_configuration=cfg)
    return client.ApiClient(cfg)


def namespace(integ: KubernetesIntegration) -> str:
    """The configured namespace, else the pod's own, else the kubeconfig context's, else default."""
    if integ.namespace:
        return integ.namespace
    if _NS_FILE.exists():
        return _NS_FILE.read_text().strip()
    try:
        from kubernetes import config

        _, ctx = config.list_kube_config_contexts(config_file=integ.kubeconfig)
        return ctx["context"].get("namespace") or "default"
    except Exception:  # noqa: BLE001 - no kubeconfig context: the default namespace
        return "default"


async def busy_by_host(pool: Any, group: str) -> dict[str, int]:
    """Jobs running or held per host (a pod's name is its workers' hostname)."""
    running = await store.running_per_worker(pool, group)
    out: dict[str, int] = {}
    for w in await workers.list_workers(pool, 120):
        if w["worker_group"] == group:
            out[w["hostname"]] = out.get(w["hostname"], 0) + running.get(w["name"], 0)
    return out


async def scale(integ: KubernetesIntegration, group: str, desired: int, current: int, pool: Any) -> str:
    """Scale the group's Deployment to ``desired``; returns what was done, a line each."""
    busy = await busy_by_host(pool, group) if desired < current else {}
    ns = namespace(integ)
    name = integ.deployment or f"sandmill-worker-{group}"
    selector = integ.label_selector or f"sandmill.dev/group={group}"

    def work() -> str:
        from kubernetes import client

        with api_client(integ) as api:
            lines = []
            if desired < current:
                core = client.CoreV1Api(api)
                for pod in core.list_namespaced_pod(ns, label_selector=selector).items:
                    cost = 100 * busy.get(pod.metadata.name, 0)  # idle: 0, deleted first
                    core.patch_namespaced_pod(pod.metadata.name, ns,
                                              {"metadata": {"annotations": {DELETION_COST: str(cost)}}})
                    lines.append(f"pod {pod.metadata.name}: {DELETION_COST}={cost}")
            client.AppsV1Api(api).patch_namespaced_deployment_scale(name, ns, {"spec": {"replicas": desired}})
            lines.append(f"deployment {ns}/{name}: replicas {current} -> {desired}")
            return "\n".join(lines)

    return await asyncio.to_thread(work)
