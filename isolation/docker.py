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
import math
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import docker
import requests
from docker.errors import DockerException, ImageNotFound, NotFound
from docker.types import LogConfig, Ulimit

from . import docker_cgroup as cg
from .base import Backend, OutputCallback, Probe
from .docker_stream import Demux, start_stdin_writer
from .spec import Outcome, RunSpec, Status

DEFAULT_IMAGE = "sandmill/job:bookworm"
WORKDIR = "/work"
LABEL = "sandmill.job"
MIB = 1024 * 1024
# How often the CPU watchdog (and, under the systemd driver, the usage sampler) looks.
POLL_S = 0.05


@dataclass
class _Job:
    """State of one run, shared between the event loop and the I/O threads."""

    job_id: str
    workdir: str
    container_id: str | None = None
    sock: socket.socket | None = None
    cgroup_rel: str | None = None  # where usage is read, if readable at all
    own_parent: bool = False  # we created /sandmill-docker/<job> and must rmdir it
    killed_for: Status | None = None  # the first limit that made us kill it
    started: float = 0.0  # monotonic time of the start call
    setup_done: threading.Event = field(default_factory=threading.Event)
    setup_begun: bool = False  # under lock: _setup got past its abandon check
    abandoned: bool = False  # under lock: cleanup ran first; _setup must create nothing
    usage: cg.Usage = field(default_factory=cg.Usage)
    lock: threading.Lock = field(default_factory=threading.Lock)


class DockerBackend(Backend):
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
    """

    name = "docker"

    def __init__(self, image: str = DEFAULT_IMAGE, docker_url: str | None = None, uid: int = 65534,
                 *, clear_image_env: bool = True, log_driver: str = "none", log_max_size: str = "1m",
                 workdir_root: str | None = None, labels: dict[str, str] | None = None,
                 api_timeout_s: float = 60.0) -> None:
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
        self._client_lock = threading.Lock()
        self._driver: str | None = None

    # -- docker plumbing (blocking; called through asyncio.to_thread) -------------------

    @property
    def api(self) -> docker.APIClient:
        with self._client_lock:
            if self._client is None:
                if self.docker_url:
                    self._client = docker.APIClient(base_url=self.docker_url, timeout=self.api_timeout_s)
                else:
                    self._client = docker.from_env(timeout=self.api_timeout_s).api
            return self._client

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
        self._driver = str(info.get("CgroupDriver") or "")
        return Probe(self.name, True, f"dockerd {info.get('ServerVersion')}, image {self.image}",
                     _gaps(info, self._is_local()))

    def _setup(self, spec: RunSpec, job: _Job) -> None:
        """Create, attach and start. Sets ``job.setup_done`` however it ends, so that a
        cleanup racing with a cancelled setup waits for the container id."""
        with job.lock:
            if job.abandoned:  # cancelled before this thread ran: create nothing
                job.setup_done.set()
                raise asyncio.CancelledError()
            job.setup_begun = True
        try:
            self._create(spec, job)
            job.started = time.monotonic()
            self.api.start(job.container_id)
        finally:
            job.setup_done.set()

    def _create(self, spec: RunSpec, job: _Job) -> None:
        lim = spec.limits
        ulimits = [Ulimit(name="core", soft=0, hard=0)]  # no core files from SIGXCPU/XFSZ
        if lim.cpu_s is not None:
            # Soft: SIGXCPU (cpu_limit); hard one second later: SIGKILL if it is ignored.
            soft = max(1, math.ceil(lim.cpu_s))
            ulimits.append(Ulimit(name="cpu", soft=soft, hard=soft + 1))
        if lim.file_size_mb is not None:
            ulimits.append(Ulimit(name="fsize", soft=lim.file_size_mb * MIB, hard=lim.file_size_mb * MIB))
        if lim.open_files is not None:
            ulimits.append(Ulimit(name="nofile", soft=lim.open_files, hard=lim.open_files))
        tmp_opts = "rw,nosuid,nodev,mode=1777"
        if lim.tmp_mb is not None:
            tmp_opts += f",size={lim.tmp_mb}m"
        host: dict[str, Any] = dict(
            binds={job.workdir: {"bind": WORKDIR, "mode": "rw"}},
            network_mode="host" if spec.network == "host" else "none",
            read_only=True,
            tmpfs={"/tmp": tmp_opts},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            init=True,
            log_config=self._log_config(),
            ulimits=ulimits,
        )
        if lim.pids is not None:
            host["pids_limit"] = lim.pids + 1  # + docker-init, which is not the job's
        if lim.memory_mb is not None:
            host["mem_limit"] = lim.memory_mb * MIB
            host["memswap_limit"] = lim.memory_mb * MIB  # no swap: memory+swap = memory
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
            name=f"sandmill-{job.job_id}",
            labels={**self.labels, LABEL: "1", f"{LABEL}.id": job.job_id},
            host_config=self.api.create_host_config(**host),
        )
        job.container_id = created["Id"]
        # Attach before start, or early output would be lost.
        attached = self.api.attach_socket(job.container_id, params={
            "stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        job.sock = attached._sock  # the raw socket: SocketIO cannot half-close

    def _log_config(self) -> LogConfig:
        if self.log_driver in ("json-file", "local"):
            return LogConfig(type=self.log_driver, config={"max-size": self.log_max_size, "max-file": "1"})
        return LogConfig(type=self.log_driver)

    def _kill(self, job: _Job, reason: Status | None) -> None:
        """SIGKILL the container (idempotent; 'not running' is fine)."""
        with job.lock:
            if reason is not None and job.killed_for is None:
                job.killed_for = reason
        if job.container_id is None:
            return
        with contextlib.suppress(DockerException, requests.RequestException):
            self.api.kill(job.container_id)

    def _finish(self, job: _Job) -> dict[str, Any]:
        """Wait for the exit and return the container State."""
        assert job.container_id is not None
        # After the output's EOF it has usually exited already: one round trip, not two.
        state = self.api.inspect_container(job.container_id)["State"]
        if state.get("Running") or state.get("Status") in ("running", "created", "restarting"):
            self.api.wait(job.container_id)
            state = self.api.inspect_container(job.container_id)["State"]
        return state

    async def _exit_state(self, job: _Job, deadline: float) -> dict[str, Any]:
        """The State once the container exited. The output's EOF normally means that
        already (docker-init holds stdout/stderr until it exits), but the wall clock
        still applies should it not."""
        finish = asyncio.ensure_future(asyncio.to_thread(self._finish, job))
        try:
            return await asyncio.wait_for(asyncio.shield(finish), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            await asyncio.to_thread(self._kill, job, Status.timeout)
            return await finish

    def _cleanup(self, job: _Job) -> None:
        """Remove container (killing it), socket, work dir and parent cgroup. Never
        raises. Waits first for a setup still running in its thread; a setup that has
        not begun (its executor job was cancelled, or is yet to run) is abandoned."""
        with job.lock:
            begun = job.setup_begun
            job.abandoned = not begun
        if begun:
            job.setup_done.wait(self.api_timeout_s * 3)
        if job.sock is not None:
            with contextlib.suppress(OSError):
                job.sock.close()
        if job.container_id is not None:
            for _ in range(3):  # dockerd may still be tearing the task down
                try:
                    self.api.remove_container(job.container_id, force=True, v=True)
                    break
                except NotFound:
                    break
                except Exception:  # cleanup must go on: the work dir and cgroup too
                    time.sleep(0.2)
        if job.own_parent:
            cg.remove_parent(job.job_id)
        shutil.rmtree(job.workdir, ignore_errors=True)

    # -- the run ------------------------------------------------------------------------

    async def run(self, spec: RunSpec, on_output: OutputCallback | None = None) -> Outcome:
        """Run ``spec`` in a fresh container; see the module docstring for the setup."""
        loop = asyncio.get_running_loop()
        try:
            workdir = _make_workdir(spec.files, self.uid, self.workdir_root)
        except (OSError, ValueError) as e:
            return Outcome(Status.sandbox_error, detail=f"cannot prepare work dir: {e}")
        job = _Job(job_id=uuid.uuid4().hex[:16], workdir=workdir)
        try:
            return await self._run(spec, job, loop, on_output)
        finally:
            # Shielded, and waited for even if cancelled again: the contract is that no
            # container outlives the task that ran it.
            cleanup = asyncio.ensure_future(asyncio.to_thread(self._cleanup, job))
            while not cleanup.done():
                try:
                    await asyncio.shield(cleanup)
                except asyncio.CancelledError:
                    continue

    async def _run(self, spec: RunSpec, job: _Job, loop: asyncio.AbstractEventLoop,
                   on_output: OutputCallback | None) -> Outcome:
        lim = spec.limits
        try:
            await asyncio.to_thread(self._setup, spec, job)
        except ImageNotFound:
            return Outcome(Status.sandbox_error,
                           detail=f"image {self.image} not found; build it with isolation/images/build.sh")
        except (DockerException, requests.RequestException) as e:
            return Outcome(Status.sandbox_error, detail=f"docker could not start the job: {e}")
        assert job.sock is not None and job.container_id is not None
        started = job.started

        emit = _in_loop(loop, on_output) if on_output is not None else None
        # Kill from another thread: dockerd's kill waits for the exit, and the exit waits
        # for the attach stream to drain, which is the reader's job; killing from the
        # reader thread would deadlock.
        def overflow() -> None:
            threading.Thread(target=self._kill, args=(job, Status.output_limit), daemon=True).start()
        demux = Demux(job.sock, lim.output_bytes, emit, overflow)
        start_stdin_writer(job.sock, spec.stdin)
        reader = asyncio.ensure_future(asyncio.to_thread(demux.run))
        try:
            await self._watch(spec, job, reader, started)
            state = await self._exit_state(job, started + lim.wall_s + 1.0)
        except asyncio.CancelledError:
            await asyncio.to_thread(self._kill, job, None)
            await asyncio.gather(reader, return_exceptions=True)
            raise
        except (DockerException, requests.RequestException) as e:
            await asyncio.to_thread(self._kill, job, None)
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
        _classify(out, state, job, spec)
        out.files = _collect(job.workdir, spec.collect, lim.output_bytes)
        return out

    async def _watch(self, spec: RunSpec, job: _Job, reader: asyncio.Future[None], started: float) -> None:
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
                await asyncio.to_thread(self._kill, job, Status.timeout)
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
                await asyncio.to_thread(self._kill, job, Status.cpu_limit)


def _host_has_swap() -> bool:
    try:
        with open("/proc/swaps") as f:
            return len(f.read().splitlines()) > 1
    except OSError:
        return False


def _gaps(info: dict[str, Any], local: bool) -> dict[str, str]:
    """Conformance cases this dockerd cannot pass, with the reason (keys are
    isolation.base.CONFORMANCE_CASES names)."""
    gaps: dict[str, str] = {}
    if not info.get("MemoryLimit", True):
        gaps["memory_limit_children"] = "dockerd reports no memory cgroup support (MemoryLimit false)"
    elif not info.get("SwapLimit", True) and (not local or _host_has_swap()):
        gaps["memory_limit_children"] = ("no swap accounting (SwapLimit false; boot with swapaccount=1): "
                                         "memswap_limit is ignored and a job can swap past its memory")
    if not info.get("PidsLimit", True):
        gaps["fork_bomb"] = "dockerd reports no pids cgroup support (PidsLimit false)"
    # A dockerd whose cgroups we cannot read (not on a local socket) still passes
    # cpu_limit through RLIMIT_CPU; only the whole-job watchdog and usage numbers are
    # lost, which no case tests: documented in the README, not a gap.
    return gaps


def _in_loop(loop: asyncio.AbstractEventLoop, cb: OutputCallback) -> Callable[[str, bytes], None]:
    """``cb`` called from the reader thread but run in the event loop, in order."""
    def emit(name: str, chunk: bytes) -> None:
        loop.call_soon_threadsafe(cb, name, chunk)
    return emit


def _classify(out: Outcome, state: dict[str, Any], job: _Job, spec: RunSpec) -> None:
    """Status from why we killed it, then Docker's OOM flag, then the exit code.

    docker-init (like the shell) reports a child killed by signal N as 128+N, and that
    is all Docker tells us: an explicit ``exit(137)`` reads as SIGKILL here.
    """
    code = state.get("ExitCode")
    out.exit_code = code
    sig = _signal_of(code)
    if sig is not None:
        out.signal = sig.name
    lim = spec.limits
    if job.killed_for is not None:
        out.status = job.killed_for
        return
    # An OOM kill of any process of the job counts, even when its parent then exited
    # non-zero by itself (the cgroup's count: Docker's flag can lag on some versions).
    if state.get("OOMKilled") or (code != 0 and job.usage.oom_kills > 0):
        out.status = Status.memory_limit
        return
    if sig is signal.SIGXCPU:
        out.status = Status.cpu_limit
        return
    if sig is signal.SIGKILL and lim.cpu_s is not None and job.usage.cpu_ns >= lim.cpu_s * 1e9:
        out.status = Status.cpu_limit  # the RLIMIT_CPU hard limit
        return
    if sig is not None:
        out.status = Status.signalled
        return
    out.status = Status.success if code == 0 else Status.exit_nonzero
    if state.get("Error"):
        out.detail = str(state["Error"])


def _signal_of(code: int | None) -> signal.Signals | None:
    if code is None or not 128 < code < 128 + 65:
        return None
    try:
        return signal.Signals(code - 128)
    except ValueError:
        return None


def _safe_rel(name: str) -> str:
    rel = os.path.normpath(name)
    if os.path.isabs(rel) or rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        raise ValueError(f"file name {name!r} escapes the work dir")
    return rel


def _make_workdir(files: dict[str, bytes], uid: int, root: str | None) -> str:
    """A fresh, empty dir with ``files`` in it, owned by the job's uid (when we are
    root) so the job can write next to them."""
    d = tempfile.mkdtemp(prefix="sandmill-docker-", dir=root)
    try:
        for name, data in files.items():
            path = os.path.join(d, _safe_rel(name))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        if os.geteuid() == 0:
            for base, dirs, names in os.walk(d):
                for n in [*dirs, *names]:
                    os.lchown(os.path.join(base, n), uid, uid)
            os.chown(d, uid, uid)
        else:
            os.chmod(d, 0o777)  # not root: cannot chown; let the job's uid write
        return d
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise


def _collect(workdir: str, names: list[str], cap: int) -> dict[str, bytes]:
    """Read back ``names`` (missing ones are skipped), each capped at ``cap`` bytes.

    We read as root what the job wrote: a symlink (even in a parent component) must not
    lead outside the work dir, so resolve it and open with O_NOFOLLOW.
    """
    got: dict[str, bytes] = {}
    real_root = os.path.realpath(workdir)
    for name in names:
        try:
            path = os.path.join(workdir, _safe_rel(name))
        except ValueError:
            continue
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_root]) != real_root:
            continue
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue  # a FIFO or device would block or lie
            chunks, left = [], cap
            while left > 0:
                b = os.read(fd, min(left, 1 << 20))
                if not b:
                    break
                chunks.append(b)
                left -= len(b)
            got[name] = b"".join(chunks)
        finally:
            os.close(fd)
    return got
