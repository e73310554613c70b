"""Which sandbox backend a worker runs its jobs with, where their work dirs go, and the
sweep of what dead workers left behind there."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

from sandmill.isolation import Backend, cgroup_sweep, get_backend, workdir
from sandmill.profiles import Profile

from .settings import WorkerSettings, WorkerStartError

log = logging.getLogger("sandmill.worker")

# Backends whose work dirs go under a root of the worker's own (see _own_options).
OWN_ROOT_BACKENDS = ("process", "nsjail")


def work_root(profile: Profile) -> Path:
    """The shared work dir root of the profile's backend (the worker's own lives in it)."""
    opt = profile.backend.options.get("workdir_root")
    return Path(opt) if opt else workdir.default_root()


def pydeps_mount_roots() -> list[str]:
    """The python dependencies' environments dir (worker/pydeps), made if missing: the
    root under which process and nsjail bind a job's environment warm, every other
    environment masked (isolation/zygote.py, "Mount roots"). Empty where warm runs cannot
    be (not root) or the dir cannot be made."""
    if os.geteuid() != 0:
        return []
    from .pydeps.envcache import EnvCache

    try:
        return [str(EnvCache().root / "envs")]
    except OSError as e:  # the jobs with requirements then run cold
        log.warning("python dependencies' cache unusable (%s): their jobs run cold", e)
        return []


def _own_options(name: str, options: dict[str, Any], own_root: Path | None) -> dict[str, Any]:
    if name not in OWN_ROOT_BACKENDS:
        return options
    # The profile's roots and the worker's python dependencies' environments.
    roots = [*options.get("warm_mount_roots", ()), *pydeps_mount_roots()]
    options = {**options, "warm_mount_roots": roots}
    # A SIGKILLed worker leaves its jobs' work dirs behind; under a root named after the
    # worker (workdir.owner_root) a later worker can tell they are a dead worker's.
    if own_root is None:
        return options
    return {**options, "workdir_root": str(own_root)}


def _try(name: str, options: dict[str, Any], own_root: Path | None) -> tuple[Backend | None, str]:
    """The backend, built and probed, or None and why it cannot run here."""
    try:
        b = get_backend(name, **_own_options(name, options, own_root))
        p = b.probe()
    except (ImportError, OSError, ValueError, TypeError) as e:
        return None, f"backend {name} cannot be loaded: {e}"
    if not p.available:
        b.close()  # nothing of a backend that will not run stays behind (warm pools)
        return None, f"backend {name} is not available here: {p.reason}"
    return b, p.reason


def resolve_backend(profile: Profile, own_root: Path | None = None) -> tuple[Backend, str]:
    """The backend that runs the group's jobs, and why it is that one (shown in
    ``GET /api/workers/list``). An explicit kind runs jobs with that backend or raises
    WorkerStartError with the probe's reason: it never falls back to a weaker one. Only
    ``auto`` chooses: nsjail where it works, else process with the options the two share.
    With ``own_root``, process and nsjail keep their work dirs there."""
    cfg = profile.backend
    if cfg.kind != "auto":
        b, why = _try(cfg.kind, cfg.options, own_root)
        if b is None:
            raise WorkerStartError(f"{why} (the profile names kind: {cfg.kind}, which never falls"
                                   " back; kind: auto chooses nsjail or process)")
        return b, f"kind: {cfg.kind} (named by the profile)" + (f"; {why}" if why else "")
    b, why = _try("nsjail", cfg.options, own_root)
    if b is not None:
        return b, "kind: auto chose nsjail: its probe says it works here"
    b, why_process = _try("process", cfg.process_options(), own_root)
    if b is None:
        raise WorkerStartError(f"kind: auto: {why}; and {why_process}")
    reason = f"kind: auto chose process: {why}"
    log.warning("%s: %s", profile.name, reason)  # a weaker sandbox than nsjail: say so loudly
    return b, reason


async def sweep_loop(profile: Profile, settings: WorkerSettings) -> None:
    """Now and then (at start first), remove what dead workers left on this host: the
    work dirs of a worker that no longer runs, job cgroups with no process, and job
    containers whose owner is dead (a no-op where dockerd is not reachable)."""
    from sandmill.isolation.docker_sweep import sweep_stale as sweep_containers  # no SDK needed to import

    root = work_root(profile)
    parent = profile.backend.options.get("cgroup_parent", "sandmill")
    docker_url = profile.backend.options.get("docker_url") if profile.backend.kind == "docker" else None
    while True:
        try:
            dirs = await asyncio.to_thread(workdir.sweep_stale, root, settings.sweep_grace_s)
            cgs = await asyncio.to_thread(cgroup_sweep.sweep_stale, parent=parent)
            cts = await asyncio.to_thread(sweep_containers, docker_url=docker_url)
            if dirs or cgs or cts:
                log.info("removed %d work dir root(s), %d cgroup(s) and %d container(s) of dead workers",
                         len(dirs), len(cgs), len(cts))
        except Exception as e:  # noqa: BLE001 - the next sweep may work; the worker goes on
            log.warning("sweep of dead workers' leftovers failed: %s", e)
        await asyncio.sleep(settings.sweep_every_s)
