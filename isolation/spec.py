"""The isolation contract: what to run (RunSpec, Limits) and what happened (Outcome).

These are the only types that cross the boundary between the worker and a backend.
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """Every limit a job runs under. The one model for limits: profiles, scripts and
    backends all speak it. ``None`` means "no limit" for that resource."""

    model_config = ConfigDict(extra="forbid")

    wall_s: float = Field(60.0, gt=0, description="wall-clock seconds")
    cpu_s: float | None = Field(None, gt=0, description="CPU seconds, children included")
    # A bound on the rate, not the total: one job cannot starve its neighbours of CPU.
    cpu_cores: float | None = Field(1.0, gt=0, description="CPU cores the whole job may use at once (a cgroup quota)")
    memory_mb: int | None = Field(512, gt=0, description="memory of the whole job, children included")
    pids: int | None = Field(128, gt=0, description="processes and threads at once")
    output_bytes: int = Field(8 * 1024 * 1024, gt=0, description="stdout+stderr bytes kept, each")
    file_size_mb: int | None = Field(64, gt=0, description="largest file a job may write")
    tmp_mb: int | None = Field(64, gt=0, description="size of the job's /tmp")
    open_files: int | None = Field(256, gt=0, description="open file descriptors")

    @property
    def memory_bytes(self) -> int | None:
        return self.memory_mb * 1024 * 1024 if self.memory_mb else None

    @property
    def tmp_bytes(self) -> int | None:
        return self.tmp_mb * 1024 * 1024 if self.tmp_mb else None

    def merged(self, override: "Limits | dict | None") -> "Limits":
        """This model with the fields set in ``override`` replacing ours."""
        if override is None:
            return self
        data = override if isinstance(override, dict) else override.model_dump(exclude_unset=True)
        return self.model_copy(update=data)


Network = Literal["none", "host"]


@dataclass(frozen=True)
class Mount:
    """A host path the job sees at ``target``: a directory, a file or a device node,
    read-only unless ``writable``. Backends refuse (sandbox_error) a mount they cannot
    make rather than run the job without it."""

    source: str
    target: str
    writable: bool = False

    def problem(self) -> str | None:
        """Why this mount cannot be made, or None."""
        for what, p in (("source", self.source), ("target", self.target)):
            if not p.startswith("/") or os.path.normpath(p) != p or "//" in p:
                return f"mount {what} {p!r} is not an absolute, normalised path"
        if self.target in RESERVED_TARGETS:
            return f"mount target {self.target!r} is the sandbox's own"
        if not os.path.lexists(self.source):
            return f"mount source {self.source!r} does not exist"
        return None


# The sandbox's own mount points: a job mount never replaces them.
RESERVED_TARGETS = frozenset({"/", "/tmp", "/job", "/work", "/proc", "/dev"})


def mounts_problem(mounts: list[Mount]) -> str | None:
    """The first reason one of ``mounts`` cannot be made, or None."""
    for m in mounts:
        why = m.problem()
        if why:
            return why
    return None


@dataclass(frozen=True)
class GpuGrant:
    """The GPUs one job was given (isolation/gpu.py builds it). ``indexes`` are the host's
    (the N of /dev/nvidia<N>); ``devices`` the nodes the job opens read/write (its own
    /dev/nvidia<N>, then /dev/nvidiactl and /dev/nvidia-uvm*), each at /dev/<name>;
    ``files`` the driver libraries and nvidia-smi, read-only, at their host paths. A
    backend passes exactly these through, or refuses the job (sandbox_error)."""

    indexes: tuple[int, ...]
    devices: tuple[Mount, ...]
    files: tuple[Mount, ...] = ()


@dataclass
class RunSpec:
    """One command to run in a fresh sandbox.

    ``files`` are written into a fresh, empty work dir which is the command's cwd;
    ``collect`` names files (relative to the work dir) to read back into
    ``Outcome.files`` after the command ends (each capped at ``limits.output_bytes``).
    ``env`` is the job's whole environment: nothing of the worker's leaks in.
    ``warm`` names the file in ``files`` that ``argv`` runs with Python (``[python,
    -u, warm, ...]``): a backend with warm interpreters may then run it by forking a
    pre-started ``argv[0]`` instead of exec'ing it (isolation/warm.py), same sandbox.
    That file must be runtime code, the same for many jobs (a language wrapper), never
    job data: warm interpreters keep it compiled, and every job forks from them.
    ``mounts`` are host paths bound into the sandbox (``Mount``), read-only by default.
    ``gpu``: the GPUs passed through to the job (``GpuGrant``); None for most jobs.
    """

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    collect: list[str] = field(default_factory=list)
    stdin: bytes = b""
    limits: Limits = field(default_factory=Limits)
    network: Network = "none"
    warm: str | None = None
    mounts: list[Mount] = field(default_factory=list)
    gpu: GpuGrant | None = None


class Status(str, enum.Enum):
    success = "success"
    exit_nonzero = "exit_nonzero"
    timeout = "timeout"
    cpu_limit = "cpu_limit"
    memory_limit = "memory_limit"
    output_limit = "output_limit"
    signalled = "signalled"
    sandbox_error = "sandbox_error"


@dataclass
class Outcome:
    """What happened to one RunSpec."""

    status: Status
    exit_code: int | None = None
    signal: str | None = None  # e.g. "SIGKILL", when status is signalled (or a limit killed it)
    wall_ms: int = 0
    cpu_ms: int = 0
    peak_memory_kb: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    files: dict[str, bytes] = field(default_factory=dict)
    detail: str = ""  # sandbox_error reason, or backend notes
    warm: bool = False  # ran by fork from a warm interpreter (not a fresh exec)
    # the job's GPUs, set by the worker: {"index", "peak_memory_bytes", "busy_ms", ...}
    gpu: dict | None = None

    def describe(self, limits: Limits) -> str:
        """The error a user reads: which limit was hit and its value, in words."""
        s = self.status
        if s is Status.success:
            return ""
        if s is Status.exit_nonzero:
            return f"exited with code {self.exit_code}"
        if s is Status.timeout:
            return f"timed out: wall-clock limit of {limits.wall_s:g} s reached"
        if s is Status.cpu_limit:
            return f"killed: CPU time limit of {limits.cpu_s:g} s reached"
        if s is Status.memory_limit:
            return f"killed: memory limit of {limits.memory_mb} MB reached"
        if s is Status.output_limit:
            return f"killed: output limit of {limits.output_bytes} bytes reached"
        if s is Status.signalled:
            return f"killed by signal {self.signal}"
        return f"sandbox error: {self.detail}"

    def to_json(self) -> dict:
        """The outcome as stored with the completed job (no output bodies)."""
        return {
            "status": self.status.value,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "wall_ms": self.wall_ms,
            "cpu_ms": self.cpu_ms,
            "peak_memory_kb": self.peak_memory_kb,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "detail": self.detail,
            "warm": self.warm,
            **({"gpu": self.gpu} if self.gpu is not None else {}),  # GPU jobs only
        }
