"""The warm pool: zygotes for one backend, per interpreter kind (a Python interpreter with
its runtime script, the native exec zygote, a warm bash), started on first use and kept
idle between jobs (warm.py runs jobs on them)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path

from . import bash_zygote, launcher
from .cgroups import CgroupUnavailable, JobCgroup
from .warm_prepare import WarmPrepared
from .warm_zygote import WarmError, Zygote

__all__ = ["BASH", "DEFAULT_PRELOAD", "NATIVE", "PYTHON_FLAGS", "START_TIMEOUT_S", "Starter", "WarmPool"]

log = logging.getLogger(__name__)

ZYGOTE_SOURCE = resources.files("sandmill.isolation").joinpath("zygote.py").read_text()
# Imported once by each zygote, so jobs that use them skip the import.
DEFAULT_PRELOAD = ("json", "re", "traceback", "typing", "datetime", "collections",
                   "functools", "itertools", "base64", "hashlib", "random", "math")
START_TIMEOUT_S = 10.0
PYTHON_FLAGS = ("-u", "-B")  # flags a warm run may carry: the zygote runs with them
NATIVE = "native"  # the interpreter of a pool key served by the native exec zygote
BASH = "bash:"  # + a bash: the key of warm bash zygotes (bash_zygote.py)


# A backend's way of starting one zygote: (argv tail to run, zygote dir, socket fd to
# pass, cgroup to put it in) -> the started process. The argv tail is the interpreter
# command; the backend wraps it in its sandbox.
Starter = Callable[[list[str], Path, int, JobCgroup | None], Awaitable[asyncio.subprocess.Process]]


class WarmPool:
    """Zygotes for one backend, started on first use, one per job running at once.

    ``starter`` launches the interpreter in the backend's sandbox. ``uid``/``gid`` own
    the zygote's jobs dir. The first failure to start (or a setup failure of a job,
    e.g. where the kernel forbids unprivileged user namespaces) turns the pool off:
    ``disabled`` says why, and jobs run cold from then on.
    """

    def __init__(self, starter: Starter, root: Path, uid: int | None, gid: int | None, *,
                 mount_at: str | None = None, hostname: str | None = None,
                 cgroup_parent: str = "sandmill", preload: tuple[str, ...] = DEFAULT_PRELOAD,
                 memory_mb: int = 256, python: str = "/usr/bin/python3",
                 mount_roots: tuple[str, ...] = (), native: bool = False) -> None:
        self.starter = starter
        # Dirs the zygote sees and every job process masks, binding only its own mounts
        # from under them (zygote.py, "Mount roots").
        self.mount_roots = tuple(mount_roots)
        self.root = root
        self.mount_at = mount_at  # where a zygote sees its dir (None: at the same path)
        self.python = python  # the interpreter of the zygotes that exec other programs
        self.hostname = hostname
        self.cgroup_parent = cgroup_parent
        self.uid = uid
        self.gid = gid
        self.preload = preload
        self.memory_mb = memory_mb
        self.idle: dict[tuple[str, bytes], list[Zygote]] = {}
        self.disabled: str | None = None
        # warm_prepare.py: the zygote each lane's running job is on (from its J), the
        # set-ups waiting for their lane's next J, and the zygotes kept for a set-up
        self.lanes: dict[object, Zygote] = {}
        self.waiting: dict[object, WarmPrepared] = {}
        self.reserved: dict[Zygote, WarmPrepared] = {}
        # the native exec zygote (launcher.c), where the starter can run a host binary
        # (``native``): built on first use; "" once it is off here
        self.launcher: str | None = None if native else ""
        self.bash: dict[str, str] = {}  # a bash -> its builtin, built on first use ("": none)

    async def native(self) -> str | None:
        """The native exec zygote's path, built on first use; None where there is none
        (no compiler, switched off, or it failed here: exec jobs use the Python one)."""
        if self.launcher is None:
            self.launcher = await asyncio.to_thread(launcher.build) or ""
        return self.launcher or None

    async def warm_bash(self, program: str) -> bool:
        """Whether bash jobs of ``program`` fork from a warm bash (bash_zygote.py): built on
        first use, where the native exec zygote is on."""
        if not await self.native():
            return False
        if program not in self.bash:
            self.bash[program] = await asyncio.to_thread(bash_zygote.build, program) or ""
        return bool(self.bash[program])

    def kind_off(self, python: str, why: str) -> None:
        """A zygote of kind ``python`` failed to start or to set a job up: that kind is off
        here from now on. The native exec zygote's jobs then fork from the Python one, warm
        bash's are exec'd; a Python zygote's failure turns warm runs off (``disable``)."""
        if python == NATIVE:
            was, self.launcher = self.launcher, ""
            what = "native exec zygote off, exec jobs fork from the Python one"
        elif python.startswith(BASH):
            bash = python[len(BASH):]
            was, self.bash[bash] = self.bash.get(bash), ""
            what = "warm bash off, bash jobs are exec'd"
        else:
            self.disable(why)
            return
        if was:
            log.warning("%s: %s", what, why)
        for z in self.idle.pop((python, b""), []):
            z.close()

    async def acquire(self, python: str, script: str, source: bytes) -> Zygote:
        """An idle zygote for ``python`` with ``source`` (the runtime script, named
        ``script``) compiled, or a new one. Raises WarmError."""
        if self.disabled:
            raise WarmError(self.disabled)
        key = (python, source)
        idle = self.idle.setdefault(key, [])
        while idle:
            z = idle.pop()
            if not z.broken and z.proc.returncode is None:
                return z
            z.close()
        try:
            return await self._start(key, script)
        except WarmError as e:
            self.kind_off(python, str(e))
            raise

    def release(self, z: Zygote) -> None:
        """Give ``z`` back after a job that ended normally; a broken one is closed."""
        if z.broken or z.proc.returncode is not None or self.disabled:
            z.close()
        elif z not in self.reserved:  # else kept for the job prepared on it
            self.idle.setdefault(z.key, []).append(z)

    def disable(self, why: str) -> None:
        if self.disabled is None:
            log.warning("warm python off, jobs run cold: %s", why)
            self.disabled = why
        self.close()

    def close(self) -> None:
        """Stop every idle zygote (set-ups made ahead are discarded first)."""
        for p in [*self.waiting.values(), *self.reserved.values()]:
            p.discard()
        for zs in self.idle.values():
            for z in zs:
                z.close()
        self.idle.clear()

    async def _start(self, key: tuple[str, bytes], script: str) -> Zygote:
        python, source = key
        zdir = self.root / f"warm-{uuid.uuid4().hex[:12]}"
        zdir.mkdir(parents=True, mode=0o700)
        if self.uid is not None:
            os.chown(zdir, self.uid, self.gid if self.gid is not None else -1)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        ours.setblocking(False)
        cgroup: JobCgroup | None = None
        proc = None
        try:
            cgroup = JobCgroup.create(memory_bytes=self.memory_mb * 1024 * 1024, pids=64,
                                      parent=self.cgroup_parent, prefix="warm")
            # A zygote that only execs (no runtime script) preloads nothing: its job
            # processes never use the modules, and every page it maps is torn down again
            # by each job's exec (docs/performance.md, "Warm exec").
            preload = ",".join(self.preload) if script else ""
            if python == NATIVE:
                argv = [self.launcher or "", str(theirs.fileno()), *self.mount_roots]
            elif python.startswith(BASH):
                bash = python[len(BASH):]
                argv = [bash, *bash_zygote.install(self.bash[bash], zdir, self.mount_at or str(zdir)),
                        str(theirs.fileno()), bash, *self.mount_roots]
            else:
                argv = [python, *PYTHON_FLAGS, "-E", "-s", "-c", ZYGOTE_SOURCE,
                        str(theirs.fileno()), preload, script,
                        source.decode(errors="surrogateescape"), json.dumps(self.mount_roots)]
            proc = await self.starter(argv, zdir, theirs.fileno(), cgroup)
            theirs.close()
            z = Zygote(key, proc, ours, zdir, cgroup, self.cgroup_parent,
                       native=python == NATIVE or python.startswith(BASH))
            await asyncio.wait_for(z.recv_ready(), START_TIMEOUT_S)
            z.prepare()
            return z
        except (OSError, WarmError, CgroupUnavailable, TimeoutError, ValueError) as e:
            theirs.close()
            ours.close()
            if proc is not None and proc.returncode is None:
                proc.kill()
            if cgroup is not None:
                cgroup.kill_all(timeout=0.5)
                cgroup.remove()
            shutil.rmtree(zdir, ignore_errors=True)
            raise WarmError(f"cannot start a warm interpreter ({python}): "
                            f"{type(e).__name__}: {e}") from None
