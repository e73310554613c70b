"""Which sandbox backend a worker runs its jobs with, where their work dirs go, and the
sweep of what dead workers left behind there."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from sandmill.isolation import Backend, cgroups, get_backend, workdir
from sandmill.profiles import Profile

from .settings import WorkerSettings, WorkerStartError

log = logging.getLogger("sandmill.worker")

# Backends whose work dirs go under a root of the worker's own (see _own_options).
OWN_ROOT_BACKENDS = ("process", "nsjail")


def work_root(profile: Profile) -> Path:
    """The shared work dir root of the profile's backend (the worker's own lives in it)."""
    opt = profile.backend.options.get("workdir_root")
    return Path(opt) if opt else workdir.default_root()


def _own_options(name: str, options: dict[str, Any], own_root: Path | None) -> dict[str, Any]:
    # A SIGKILLed worker leaves its jobs' work dirs behind; under a root named after the
    # worker (workdir.owner_root) a later worker can tell they are a dead worker's.
    if own_root is None or name not in OWN_ROOT_BACKENDS:
        return options
    return {**options, "workdir_root": str(own_root)}


def resolve_backend(profile: Profile, own_root: Path | None = None) -> tuple[Backend, str | None]:
    """The backend the profile names, or process with a warning that says why. With
    ``own_root``, process and nsjail keep their work dirs there."""
    kind = profile.backend.kind
    options = profile.backend.options
    candidates = ["nsjail"] if kind == "auto" else [kind]
    reason = ""
    for name in candidates:
        try:
            b = get_backend(name, **_own_options(name, options, own_root))
            p = b.probe()
        except (ImportError, OSError, ValueError, TypeError) as e:
            p, b = None, None
            reason = f"backend {name} cannot be loaded: {e}"
        else:
            if p.available:
                return b, None
            reason = f"backend {name} is not available here: {p.reason}"
        if kind != "auto" and profile.backend.fallback == "refuse":
            raise WorkerStartError(reason)
    if kind == "process":
        raise WorkerStartError(reason)
    return (get_backend("process", **_own_options("process", {}, own_root)),
            f"{reason}; running jobs with the process backend instead")


async def sweep_loop(profile: Profile, settings: WorkerSettings) -> None:
    """Now and then (at start first), remove what dead workers left on this host: the
    work dirs of a worker that no longer runs, and job cgroups with no process."""
    root = work_root(profile)
    parent = profile.backend.options.get("cgroup_parent", "sandmill")
    while True:
        try:
            dirs = await asyncio.to_thread(workdir.sweep_stale, root, settings.sweep_grace_s)
            cgs = await asyncio.to_thread(cgroups.sweep_stale, parent=parent)
            if dirs or cgs:
                log.info("removed %d work dir root(s) and %d cgroup(s) of dead workers",
                         len(dirs), len(cgs))
        except OSError as e:
            log.warning("sweep of dead workers' leftovers failed: %s", e)
        await asyncio.sleep(settings.sweep_every_s)
