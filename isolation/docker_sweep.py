"""Containers that outlived their worker: who owns a job container, and the sweep that
removes those of dead owners.

Every job container carries ``sandmill.job=1`` and ``sandmill.owner=<host>/<owner>``,
where ``<owner>`` is ``workdir.owner_id()`` of the process that ran it (pid namespace,
pid, start time). A worker SIGKILLed mid-job (or a ``sandmill up`` killed hard) leaves its
containers running; the next worker's start sweep, or ``sandmill up`` as it stops,
removes exactly those whose owner is sure to be dead on this host. A live worker's
containers, another host's, or another pid namespace's are never touched.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from . import workdir

log = logging.getLogger(__name__)

LABEL = "sandmill.job"
OWNER_LABEL = "sandmill.owner"
_swept_at_start = threading.Event()  # the start sweep runs once per process


def owner_value(pid: int | None = None) -> str:
    """The ``sandmill.owner`` label of containers run by process ``pid`` (default: us)."""
    return f"{socket.gethostname()}/{workdir.owner_id(pid)}"


def owner_pid(value: str) -> int | None:
    """The pid an owner label names, when it is this host's; else None."""
    host, _, owner = value.partition("/")
    parts = owner.split("-")
    if host != socket.gethostname() or len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


def owner_dead(value: str) -> bool:
    """True only when the owner label names a process of this host and pid namespace
    that no longer runs."""
    host, _, owner = value.partition("/")
    return host == socket.gethostname() and workdir.owner_dead(owner)


def sweep_stale(api: Any | None = None, *, pids: set[int] | None = None,
                docker_url: str | None = None, timeout_s: float = 30.0) -> list[str]:
    """Force-remove the job containers whose owner is dead (any state: a running fork
    bomb included). With ``pids``, only those whose owner had one of these pids (``sandmill
    up`` removing its own workers' leftovers). ``api`` is a ``docker.APIClient`` (default:
    one for ``docker_url`` / DOCKER_HOST). Returns the ids removed; [] when dockerd is not
    reachable (a sweep is best effort: the next one tries again)."""
    try:
        import docker
        from docker.errors import DockerException, NotFound
        import requests
    except ImportError:
        return []
    try:
        if api is None:
            api = (docker.APIClient(base_url=docker_url, timeout=timeout_s) if docker_url
                   else docker.from_env(timeout=timeout_s).api)
        found = api.containers(all=True, filters={"label": [LABEL, OWNER_LABEL]})
    except (DockerException, requests.RequestException, OSError) as e:
        log.debug("docker sweep skipped: %s", e)
        return []
    removed = []
    for c in found:
        owner = (c.get("Labels") or {}).get(OWNER_LABEL, "")
        if not owner_dead(owner) or (pids is not None and owner_pid(owner) not in pids):
            continue
        try:
            api.remove_container(c["Id"], force=True, v=True)
            removed.append(c["Id"])
        except NotFound:
            removed.append(c["Id"])  # gone meanwhile: as good
        except (DockerException, requests.RequestException, OSError) as e:
            log.warning("cannot remove container %s of dead worker %s: %s", c["Id"][:12], owner, e)
    if removed:
        log.info("removed %d container(s) of dead workers", len(removed))
    return removed


def sweep_at_start(api: Any) -> None:
    """The first call in this process starts ``sweep_stale`` in a background thread
    (the backend's probe calls it: a worker's start does not wait for dockerd)."""
    if not _swept_at_start.is_set():
        _swept_at_start.set()
        threading.Thread(target=sweep_stale, args=(api,), name="sandmill-docker-sweep", daemon=True).start()
