"""Docker backend: one fresh container per job, through the ``docker`` SDK.

Per job: a fresh host temp dir bind-mounted rw at /work (the cwd), a fresh tmpfs /tmp,
read-only root, no network (unless ``network="host"``), all capabilities dropped,
no-new-privileges, a non-root user, ``--init`` (docker-init reaps and, as PID 1, takes
every descendant down with it), memory = memory+swap, a pids limit, rlimits for CPU,
file size, open files and core dumps, and no Docker log (see ``log_driver``).

Stdio goes over the attach socket (attached before start so nothing is missed): stdin is
written then half-closed (EOF), stdout/stderr are demultiplexed through byte caps. The
wall clock, CPU watchdog and output cap all end in ``kill``: a wait timeout alone would
leave the container running. The container is always removed explicitly (auto-remove
races with reading its state), also on cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import uuid
from typing import Any

import docker
import requests
from docker.errors import DockerException, ImageNotFound

from . import docker_cgroup as cg
from .base import Backend, OutputCallback, Probe
from .docker_cleanup import ContainerCleanup
from .docker_config import GPU_MODE_WORDS, WORKDIR, gpu_mode, host_config
from .docker_files import collect, make_workdir
from .docker_job import Job, in_thread
from .docker_status import classify, gaps
from .docker_stream import Demux, in_loop, start_stdin_writer
from .docker_sweep import LABEL, OWNER_LABEL, owner_value, sweep_at_start, sweep_stale
from .docker_warm import DockerWarm
from .spec import Outcome, RunSpec, Status, mounts_problem

__all__ = ["DEFAULT_IMAGE", "LABEL", "OWNER_LABEL", "DockerBackend", "sweep_stale"]

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "sandmill/job:bookworm"
# How often the CPU watchdog (and, under the systemd driver, the usage sampler) looks.
POLL_S = 0.05
# Timeout of the kill and remove calls: short, and retried, so that a slow dockerd
# cannot hold a cancel (the job's processes are killed through its cgroup first anyway).
KILL_API_TIMEOUT_S = 10.0


class DockerBackend(ContainerCleanup, Backend):
    """Runs each RunSpec in a fresh container of ``image`` on dockerd at ``docker_url``
    (default: ``DOCKER_HOST`` or the local socket), as ``uid:uid``. dockerd must see the
    worker's filesystem (the job dir is a bind mount): a daemon on this host.

    ``clear_image_env``: start the job through ``/usr/bin/env -i`` so that the image's
    ``ENV`` and Docker's own HOSTNAME/HOME do not reach it and ``spec.env`` is the
    whole environment. Turn it off for an image without ``/usr/bin/env``.
    ``log_driver``: Docker's own copy of the output. Default ``none``: we already get
    every byte over the attach socket, and with ``json-file`` a flooding job takes
    dockerd seconds to kill (it must log the backlog first; docs/performance.md).
    ``json-file`` (or ``local``) is kept capped at ``log_max_size`` when chosen.
    ``workdir_root``: where job dirs are made (default: the temp dir; dockerd must see
    the same path). ``labels``: added to every container (every container always has
    ``sandmill.job=1`` and ``sandmill.job.id=<id>``).
    ``warm``: jobs start by fork in an already running container of the image
    (docker_warm.py): None (default) where the probe says it works, else cold; True:
    the probe refuses the backend where it cannot; False: a fresh container per job.
    """

    name = "docker"

    def __init__(self, image: str = DEFAULT_IMAGE, docker_url: str | None = None, uid: int = 65534,
                 *, clear_image_env: bool = True, log_driver: str = "none", log_max_size: str = "1m",
                 workdir_root: str | None = None, labels: dict[str, str] | None = None,
                 api_timeout_s: float = 60.0, warm: bool | None = None) -> None:
        self.image = image
        self.docker_url = docker_url
        self.uid = uid
        self.clear_image_env = clear_image_env
        self.log_driver = log_driver
        self.log_max_size = log_max_size
        self.workdir_root = workdir_root
        self.labels = dict(labels or {})
        self.api_timeout_s = api_timeout_s
        self._client: docker.APIClient | None = None
        self._kill_client: docker.APIClient | None = None
        self._client_lock = threading.Lock()
        self._driver: str | None = None
        self._gpu_mode: str | None = None  # how GPUs pass (docker_config.gpu_mode), from the probe
        self._cleanups: set[threading.Thread] = set()  # clean-ups still going on
        self.warm = DockerWarm(self, warm) if warm is not False else None
        self.warm_pool = self.warm.pool if self.warm is not None else None

    # -- docker plumbing (blocking; called in threads) ---------------------------------

    def _new_client(self, timeout: float) -> docker.APIClient:
        if self.docker_url:
            return docker.APIClient(base_url=self.docker_url, timeout=timeout)
        return docker.from_env(timeout=timeout).api

    @property
    def api(self) -> docker.APIClient:
        with self._client_lock:
            if self._client is None:
                self._client = self._new_client(self.api_timeout_s)
            return self._client

    @property
    def kill_api(self) -> docker.APIClient:
        """A client with a short timeout, for kill and remove (retried by the caller)."""
        with self._client_lock:
            if self._kill_client is None:
                self._kill_client = self._new_client(min(self.api_timeout_s, KILL_API_TIMEOUT_S))
            return self._kill_client

    def _is_local(self) -> bool:
        """True when dockerd's cgroups are this host's (a unix socket here)."""
        url = self.docker_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        return url.startswith(("unix://", "/")) and os.path.isdir(cg.ROOT)

    def _cgroup_driver(self) -> str:
        if self._driver is None:
            info = self.api.info()
            self._driver = str(info.get("CgroupDriver") or "")
        return self._driver

    def probe(self) -> Probe:
        """Available when dockerd answers and the image exists. Gaps: limits the
        daemon's kernel cannot enforce (from ``docker info``)."""
        try:
            self.api.ping()
        except Exception as e:  # any failure to talk to dockerd means "not here"
            return Probe(self.name, False, f"dockerd not reachable: {e}")
        try:
            self.api.inspect_image(self.image)
        except ImageNotFound:
            return Probe(self.name, False,
                         f"image {self.image} missing; build it with isolation/images/build.sh")
        except DockerException as e:
            return Probe(self.name, False, f"cannot inspect image {self.image}: {e}")
        try:
            info = self.api.info()
        except DockerException as e:
            return Probe(self.name, False, f"docker info failed: {e}")
        self._driver, self._gpu_mode = str(info.get("CgroupDriver") or ""), gpu_mode(info)
        sweep_at_start(self.api)  # a starting worker removes dead workers' containers
        warm = "cold (warm: false)"
        if self.warm is not None:
            why = self.warm.why_not()
            if why and self.warm.requested:  # asked for warm: never run colder than configured
                return Probe(self.name, False, f"warm: true, but warm docker cannot run here: {why}")
            warm = f"cold (warm unavailable: {why})" if why else "warm"
        return Probe(self.name, True, f"dockerd {info.get('ServerVersion')}, image {self.image},"
                     f" {GPU_MODE_WORDS[self._gpu_mode]}, {warm}", gaps(info, self._is_local()))

    def _setup(self, spec: RunSpec, job: Job) -> None:
        """Create, attach and start. Sets ``job.setup_done`` however it ends, so that a
        cleanup racing with a cancelled setup waits for the container id."""
        with job.lock:
            if job.abandoned:  # cancelled before this thread ran: create nothing
                job.setup_done.set()
                raise asyncio.CancelledError()
            job.setup_begun = True
        try:
            self._create(spec, job)
            with job.lock:
                if job.abandoned:  # cancelled while creating: the clean-up removes it
                    raise asyncio.CancelledError()
                job.started = time.monotonic()
            self.api.start(job.container_id)
        finally:
            job.setup_done.set()

    def _create(self, spec: RunSpec, job: Job) -> None:
        if spec.gpu is not None and self._gpu_mode is None:
            self._gpu_mode = gpu_mode(self.api.info())
        host = host_config(spec, job.workdir, self.log_driver, self.log_max_size, self._gpu_mode or "devices")
        if self._is_local() and self._cgroup_driver() == "cgroupfs":
            host["cgroup_parent"] = cg.job_parent(job.job_id)
            job.cgroup_rel = cg.job_parent(job.job_id)
            job.own_parent = True
        command = list(spec.argv)
        if self.clear_image_env:
            command = ["/usr/bin/env", "-i", "--", *(f"{k}={v}" for k, v in spec.env.items()), *command]
        created = self.api.create_container(
            self.image,
            command=command,
            entrypoint=[],  # a custom image's ENTRYPOINT must not wrap the job
            environment=dict(spec.env),
            user=f"{self.uid}:{self.uid}",
            working_dir=WORKDIR,
            # NetworkDisabled: a bare netns made by runc, faster than dockerd's "none" sandbox.
            network_disabled=spec.network != "host",
            stdin_open=True,
            detach=False,  # with stdin_open this sets StdinOnce: our half-close is EOF
            name=job.name,
            # The owner label lets a later worker remove what we leave if we are SIGKILLed.
            labels={**self.labels, LABEL: "1", f"{LABEL}.id": job.job_id, OWNER_LABEL: owner_value()},
            host_config=self.api.create_host_config(**host),
        )
        job.container_id = created["Id"]
        # Attach before start, or early output would be lost.
        attached = self.api.attach_socket(job.container_id, params={
            "stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        job.sock = attached._sock  # the raw socket: SocketIO cannot half-close

    def _kill(self, job: Job, reason: Status | None) -> None:
        """Kill every process of the job (idempotent). Through its cgroup first, which
        needs no dockerd (a fork bomb dies even while the API is slow), then ``docker
        kill`` with a short timeout ('not running' is fine)."""
        with job.lock:
            if reason is not None and job.killed_for is None:
                job.killed_for = reason
        if job.cgroup_rel is not None:
            cg.kill_all(job.cgroup_rel, timeout=1.0)
        if job.container_id is None:
            return
        with contextlib.suppress(DockerException, requests.RequestException):
            self.kill_api.kill(job.container_id)

    def _finish(self, job: Job) -> dict[str, Any]:
        """Wait for the exit and return the container State."""
        assert job.container_id is not None
        # After the output's EOF it has usually exited already: one round trip, not two.
        state = self.api.inspect_container(job.container_id)["State"]
        if state.get("Running") or state.get("Status") in ("running", "created", "restarting"):
            self.api.wait(job.container_id)
            state = self.api.inspect_container(job.container_id)["State"]
        return state

    async def _exit_state(self, job: Job, deadline: float) -> dict[str, Any]:
        """The State once the container exited. The output's EOF normally means that
        already (docker-init holds stdout/stderr until it exits), but the wall clock
        still applies should it not."""
        finish = in_thread(self._finish, job)
        try:
            state = await asyncio.wait_for(asyncio.shield(finish), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            await in_thread(self._kill, job, Status.timeout)
            state = await finish
        job.exited = True
        return state

    # -- the run ------------------------------------------------------------------------

    async def run(self, spec: RunSpec, on_output: OutputCallback | None = None) -> Outcome:
        """Run ``spec`` in a fresh container; see the module docstring for the setup."""
        if why := mounts_problem(spec.mounts):
            return Outcome(Status.sandbox_error, detail=why)
        if self.warm is not None and (out := await self.warm.run(spec, on_output)) is not None:
            return out
        loop = asyncio.get_running_loop()
        try:
            workdir = make_workdir(spec.files, self.uid, self.workdir_root)
        except (OSError, ValueError) as e:
            return Outcome(Status.sandbox_error, detail=f"cannot prepare work dir: {e}")
        job = Job(job_id=uuid.uuid4().hex[:16], workdir=workdir)
        try:
            return await self._run(spec, job, loop, on_output)
        finally:
            # Waited for even if cancelled again: the contract is that no container
            # outlives the task that ran it.
            await self._clean(job)

    async def _run(self, spec: RunSpec, job: Job, loop: asyncio.AbstractEventLoop,
                   on_output: OutputCallback | None) -> Outcome:
        lim = spec.limits
        try:
            await in_thread(self._setup, spec, job)
        except ImageNotFound:
            return Outcome(Status.sandbox_error,
                           detail=f"image {self.image} not found; build it with isolation/images/build.sh")
        except (DockerException, requests.RequestException) as e:
            return Outcome(Status.sandbox_error, detail=f"docker could not start the job: {e}")
        assert job.sock is not None and job.container_id is not None
        started = job.started

        emit = in_loop(loop, on_output) if on_output is not None else None
        # Kill from another thread: dockerd's kill waits for the exit, and the exit waits
        # for the attach stream to drain, which is the reader's job; killing from the
        # reader thread would deadlock.
        def overflow() -> None:
            threading.Thread(target=self._kill, args=(job, Status.output_limit), daemon=True).start()
        demux = Demux(job.sock, lim.output_bytes, emit, overflow)
        start_stdin_writer(job.sock, spec.stdin)
        reader = in_thread(demux.run)
        try:
            await self._watch(spec, job, reader, started)
            state = await self._exit_state(job, started + lim.wall_s + 1.0)
        except asyncio.CancelledError:
            raise  # run()'s clean-up kills and removes it, in a thread of its own
        except (DockerException, requests.RequestException) as e:
            await in_thread(self._kill, job, None)
            await asyncio.gather(reader, return_exceptions=True)
            return Outcome(Status.sandbox_error, detail=f"docker failed during the run: {e}")
        wall_ms = int((time.monotonic() - started) * 1000)
        await reader  # EOF came before the exit was seen; this only collects it
        if job.cgroup_rel is not None:
            job.usage.merge(cg.read_usage(job.cgroup_rel))

        out = Outcome(
            status=Status.success,
            wall_ms=wall_ms,
            cpu_ms=job.usage.cpu_ns // 1_000_000,
            peak_memory_kb=job.usage.peak_bytes // 1024,
            stdout=bytes(demux.out["stdout"]),
            stderr=bytes(demux.out["stderr"]),
            stdout_truncated=demux.truncated["stdout"],
            stderr_truncated=demux.truncated["stderr"],
        )
        classify(out, state, job.killed_for, job.usage.oom_kills, job.usage.cpu_ns, spec)
        out.files = collect(job.workdir, spec.collect, lim.output_bytes)
        return out

    async def _watch(self, spec: RunSpec, job: Job, reader: asyncio.Future[None], started: float) -> None:
        """Until the output reaches EOF (the container exited): enforce the wall clock
        and the whole-job CPU limit, and sample usage where it is not kept for us."""
        lim = spec.limits
        deadline = started + lim.wall_s
        cpu_ns_limit = int(lim.cpu_s * 1e9) if lim.cpu_s is not None else None
        sample = job.cgroup_rel is not None or (self._is_local() and cpu_ns_limit is not None) \
            or (self._is_local() and self._driver == "systemd")
        while not reader.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                await in_thread(self._kill, job, Status.timeout)
                await reader
                return
            await asyncio.wait({reader}, timeout=min(POLL_S, remaining) if sample else remaining)
            if not sample or reader.done():
                continue
            if job.cgroup_rel is None:  # systemd driver: find the scope once it exists
                job.cgroup_rel = cg.scope_path(job.container_id or "")
                if job.cgroup_rel is None:
                    continue
            job.usage.merge(cg.read_usage(job.cgroup_rel))
            # RLIMIT_CPU is per process; this catches a job that spreads over children.
            if cpu_ns_limit is not None and job.usage.cpu_ns > cpu_ns_limit:
                await in_thread(self._kill, job, Status.cpu_limit)
