"""Warm Docker: jobs of a docker backend start in an already running container of its
image, by fork from the zygote inside it (``zygote.py``, as on nsjail), not in a fresh
container each.

The worker's side is the shared one (``warm.WarmPool``, ``warm_zygote.Zygote``,
``warm.run_warm``); this module is docker's ``Starter`` and its bookkeeping:

- one container per zygote, of the backend's image, with the zygote's jobs dir bound
  at /work (each job process binds its own work dir over it: the job's cwd is /work, as
  cold), started with the boot program (``docker_warm_config.BOOT``), which connects to
  a unix socket the worker listens on in that dir and receives the zygote's end of its
  socket pair (SCM_RIGHTS), then execs the zygote. The worker learns the zygote's pid
  from the connection (SO_PEERCRED) and moves it into the pool's home cgroup; every
  job's limits are its own job cgroup's, created by the worker as for nsjail.
- the zygote's end (``ContainerProc``): a pidfd says when it is gone (the container
  died or was killed), and the container is removed then, or on ``kill``.
- ``probe``: a one-off container that does what a job process does first (user/pid/
  mount namespaces, a proc mount); a program lookup in the image (``which``), cached.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import struct
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from docker.errors import DockerException, NotFound
from docker.types import LogConfig

from . import workdir
from .base import OutputCallback
from .cgroups import JobCgroup, probe_gap
from .docker_config import WORKDIR
from .docker_job import in_thread
from .docker_sweep import LABEL, OWNER_LABEL, owner_value
from .docker_warm_config import BOOT, PROBE, WHICH, warm_host_config, with_paths
from .spec import Outcome, RunSpec
from .warm import DEFAULT_PRELOAD, START_TIMEOUT_S, WarmError, WarmPool, run_warm

if TYPE_CHECKING:
    from .docker import DockerBackend

log = logging.getLogger(__name__)

WARM_LABEL = "sandmill.warm"  # on warm containers (beside sandmill.job and sandmill.owner)
REMOVE_FOR_S = 60.0
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


class ContainerProc:
    """A warm container's zygote as the pool sees its process: ``returncode`` (None
    while it runs), ``kill()``. Its end is seen through a pidfd; the container is then
    removed."""

    def __init__(self, warm: DockerWarm, name: str, pid: int) -> None:
        self.warm = warm
        self.name = name
        self.pid = pid
        self.returncode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._pidfd: int | None = os.pidfd_open(pid)
        self._loop.add_reader(self._pidfd, self._exited)

    def _stop_watch(self) -> None:
        if self._pidfd is not None:
            with contextlib.suppress(Exception):  # the loop may be closed by now
                self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None

    def _exited(self) -> None:
        self._stop_watch()
        if self.returncode is None:
            self.returncode = -signal.SIGKILL  # not our child: its status is not ours to read
        self.warm.remove(self.name)

    def kill(self) -> None:
        """SIGKILL the zygote (its jobs die with it: parent-death signal, pid namespace)
        and remove the container."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        self._stop_watch()
        if self.returncode is None:
            self.returncode = -signal.SIGKILL
        self.warm.remove(self.name)


# Why an AppArmor host runs docker jobs cold unless the profile says ``warm: true``.
APPARMOR_OPT_IN = ("dockerd confines containers with AppArmor, whose docker-default profile denies the"
                   " mount(2) a warm container needs; `warm: true` runs the warm containers without it"
                   " (isolation/README.md, 'Warm Docker')")


class DockerWarm:
    """The warm side of one ``DockerBackend``: its pool, containers and probe.

    ``requested``: the backend's ``warm`` option (True: must work, the probe refuses
    otherwise; None: where the probe says it works; never False here)."""

    def __init__(self, backend: DockerBackend, requested: bool | None,
                 preload: tuple[str, ...] = DEFAULT_PRELOAD, python: str = "/usr/bin/python3") -> None:
        self.b = backend
        self.requested = requested
        root = Path(backend.workdir_root) if backend.workdir_root else workdir.owner_root(workdir.default_root())
        self.pool = WarmPool(self._start, root, backend.uid, backend.uid, mount_at=WORKDIR,
                             preload=preload, python=python)
        self.containers: dict[str, ContainerProc | None] = {}  # name -> zygote (None: starting)
        self._why: str | None = None  # why warm runs cannot work here ("" = they can)
        self._probe_lock = threading.Lock()
        self._programs: dict[tuple[str, str], str] = {}  # (PATH, argv[0]) -> path in the image ("" none)
        self.apparmor = False  # dockerd confines containers with AppArmor (from the probe)
        self._image_env: dict[str, str] | None = None  # the image's ENV (clear_image_env off)

    # -- can it run here ----------------------------------------------------------------

    def why_not(self) -> str:
        """"" where warm containers work here, else why not (probed once: a one-off
        container does what a job process does first)."""
        with self._probe_lock:
            if self._why is None:
                self._why = self._probe()
                if self._why:
                    self.pool.disabled = f"warm docker unavailable: {self._why}"
            return self._why

    def _probe(self) -> str:
        if os.geteuid() != 0:
            return "not root (job cgroups, the zygote's cgroup move)"
        if not self.b._is_local():
            return "dockerd is not on this host (the jobs dir is a bind mount, cgroups are ours)"
        if gap := probe_gap():
            return f"no job cgroups: {gap}"
        try:
            security = self.b.api.info().get("SecurityOptions") or []
            self.apparmor = any("name=apparmor" in str(o) for o in security)
            if self.apparmor and not self.requested:  # never drop a confinement unasked
                return APPARMOR_OPT_IN
            rc, out = self._one_off([self.pool.python, "-E", "-s", "-c", PROBE], 30.0)
        except (DockerException, requests.RequestException, OSError) as e:
            return f"the warm probe container failed: {e}"
        if rc != 0:
            return (f"the warm probe (a job process's namespaces and /proc, with {self.pool.python})"
                    f" failed in a container of {self.b.image} (exit {rc}): {out.strip()[-300:]}")
        return ""

    def _one_off(self, command: list[str], timeout: float) -> tuple[int, str]:
        """Run ``command`` in a warm-configured container without a zygote; (exit, output)."""
        api = self.b.api
        host = warm_host_config(None, 64, self.apparmor)
        host["log_config"] = LogConfig(type="json-file", config={"max-size": "64k", "max-file": "1"})
        name = f"sandmill-warmprobe-{uuid.uuid4().hex[:12]}"
        try:  # removed by name: also when the create's answer is lost but dockerd made it
            api.create_container(
                self.b.image, command=command, entrypoint=[], user=f"{self.b.uid}:{self.b.uid}",
                working_dir="/", network_disabled=True, name=name,
                labels={**self.b.labels, LABEL: "1", WARM_LABEL: "probe", OWNER_LABEL: owner_value()},
                host_config=with_paths(api.create_host_config(**host)))
            api.start(name)
            rc = int(api.wait(name, timeout=timeout)["StatusCode"])
            return rc, api.logs(name).decode(errors="replace")
        finally:
            with contextlib.suppress(DockerException, requests.RequestException):
                api.remove_container(name, force=True, v=True)

    async def program(self, spec: RunSpec) -> str | None:
        """argv[0] as a path that exists and is executable in the image, or None."""
        name = spec.argv[0]
        key = (spec.env.get("PATH", DEFAULT_PATH), name)
        if key not in self._programs:
            try:
                rc, out = await in_thread(self._one_off, [self.pool.python, "-E", "-s", "-c", WHICH, *key], 30.0)
                found = json.loads(out.strip().splitlines()[-1]) if rc == 0 else [""]
            except (DockerException, requests.RequestException, OSError, ValueError, IndexError) as e:
                log.warning("cannot look %r up in %s, running cold: %s", name, self.b.image, e)
                return None
            self._programs[key] = found[0] if found and isinstance(found[0], str) else ""
        return self._programs[key] or None

    # -- a run ----------------------------------------------------------------------------

    async def run(self, spec: RunSpec, on_output: OutputCallback | None) -> Outcome | None:
        """``spec`` in a warm container; None where it must run cold (mounts, a GPU,
        network, warm off, a program the image lacks, or the warm path failed before
        any of the job's code ran)."""
        if spec.gpu is not None or spec.mounts or spec.network != "none" or not spec.argv:
            return None
        if self.pool.disabled:
            return None
        if self._why is None and await in_thread(self.why_not):  # the first run only: a probe
            return None
        if not self.b.clear_image_env:  # as a cold container: the image's ENV, then the job's
            if self._image_env is None:
                try:
                    env = (await in_thread(self.b.api.inspect_image, self.b.image))["Config"].get("Env") or []
                except (DockerException, requests.RequestException) as e:
                    log.warning("cannot read the ENV of %s, running cold: %s", self.b.image, e)
                    return None
                self._image_env = dict(v.partition("=")[::2] for v in env)
            spec = dataclasses.replace(spec, env={**self._image_env, **spec.env})
        program = await self.program(spec)
        if program is None:
            return None
        return await run_warm(self.pool, spec, on_output, program, can_exec=True)

    # -- the Starter --------------------------------------------------------------------

    async def _start(self, argv: list[str], zdir: Path, fd: int,
                     cgroup: JobCgroup | None) -> Any:
        """A warm container for one zygote: see the module docstring."""
        loop = asyncio.get_running_loop()
        path = zdir / ".boot"
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = f"sandmill-warm-{uuid.uuid4().hex[:16]}"
        try:
            lsock.bind(str(path))
            os.chown(path, self.b.uid, self.b.uid)
            lsock.listen(1)
            lsock.setblocking(False)
            self.containers[name] = None  # from here on close() removes it by name
            await in_thread(self._create_start, name, zdir, argv)
            conn, _ = await asyncio.wait_for(loop.sock_accept(lsock), START_TIMEOUT_S)
            with conn:
                pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
                if cgroup is not None:
                    cgroup.add(pid)  # before the zygote's preload: its memory is charged there
                socket.send_fds(conn, [str(fd).encode()], [fd])
            proc = ContainerProc(self, name, pid)
            closed = name not in self.containers
            self.containers[name] = proc
            if closed:  # the backend was closed meanwhile
                proc.kill()
                raise WarmError("the backend was closed")
            return proc
        except (DockerException, requests.RequestException) as e:
            self.remove(name)
            raise WarmError(f"docker could not start a warm container: {e}") from None
        except BaseException:
            self.remove(name)
            raise
        finally:
            lsock.close()
            with contextlib.suppress(OSError):
                path.unlink()

    def _create_start(self, name: str, zdir: Path, argv: list[str]) -> None:
        api = self.b.api
        host = warm_host_config(str(zdir), self.pool.memory_mb, self.apparmor)
        api.create_container(
            self.b.image,
            command=[argv[0], "-E", "-s", "-c", BOOT, f"{WORKDIR}/.boot", *argv],
            entrypoint=[], environment={"PATH": DEFAULT_PATH, "LANG": "C.UTF-8"},
            user=f"{self.b.uid}:{self.b.uid}", working_dir=WORKDIR, network_disabled=True, name=name,
            labels={**self.b.labels, LABEL: "1", f"{LABEL}.id": name, WARM_LABEL: "1",
                    OWNER_LABEL: owner_value()},
            host_config=with_paths(api.create_host_config(**host)))
        api.start(name)

    # -- removal ----------------------------------------------------------------------

    def remove(self, name: str) -> None:
        """Remove container ``name`` (forced, in a thread the backend's close waits for)."""
        if self.containers.pop(name, 0) == 0:
            return  # already being removed

        def target() -> None:
            deadline = time.monotonic() + REMOVE_FOR_S
            try:
                while True:
                    try:
                        self.b.kill_api.remove_container(name, force=True, v=True)
                        return
                    except NotFound:
                        return
                    except Exception as e:  # slow dockerd: retry for a while
                        if time.monotonic() > deadline:
                            log.error("warm container %s not removed: %s", name, e)
                            return
                        time.sleep(0.2)
            finally:
                self.b._cleanups.discard(threading.current_thread())

        t = threading.Thread(target=target, name="sandmill-docker-warm-remove", daemon=True)
        self.b._cleanups.add(t)
        t.start()

    def close(self) -> None:
        """Stop every zygote and remove every warm container of this backend."""
        self.pool.close()
        for name, proc in list(self.containers.items()):
            if proc is not None:
                proc.kill()
            else:
                self.remove(name)
