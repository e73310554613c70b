"""What a Docker job's end means: its Status from why we killed it, Docker's OOM flag
and the exit code (``classify``); and which conformance cases a dockerd cannot pass
(``gaps``, from ``docker info``)."""

from __future__ import annotations

import signal
from typing import Any

from .spec import Outcome, RunSpec, Status


def host_has_swap() -> bool:
    try:
        with open("/proc/swaps") as f:
            return len(f.read().splitlines()) > 1
    except OSError:
        return False


def gaps(info: dict[str, Any], local: bool) -> dict[str, str]:
    """Conformance cases this dockerd cannot pass, with the reason (keys are
    isolation.base.CONFORMANCE_CASES names)."""
    gaps: dict[str, str] = {}
    if not info.get("MemoryLimit", True):
        gaps["memory_limit_children"] = "dockerd reports no memory cgroup support (MemoryLimit false)"
    elif not info.get("SwapLimit", True) and (not local or host_has_swap()):
        gaps["memory_limit_children"] = ("no swap accounting (SwapLimit false; boot with swapaccount=1): "
                                         "memswap_limit is ignored and a job can swap past its memory")
    if not info.get("PidsLimit", True):
        gaps["fork_bomb"] = "dockerd reports no pids cgroup support (PidsLimit false)"
    if not info.get("CpuCfsQuota", True):
        gaps["cpu_cores"] = "dockerd reports no CFS quota support (CpuCfsQuota false): nano_cpus is ignored"
    # A dockerd whose cgroups we cannot read (not on a local socket) still passes
    # cpu_limit through RLIMIT_CPU; only the whole-job watchdog and usage numbers are
    # lost, which no case tests: documented in the README, not a gap.
    return gaps


def classify(out: Outcome, state: dict[str, Any], killed_for: Status | None, oom_kills: int,
             cpu_ns: int, spec: RunSpec) -> None:
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
    if killed_for is not None:
        out.status = killed_for
        return
    # An OOM kill of any process of the job counts, even when its parent then exited
    # non-zero by itself (the cgroup's count: Docker's flag can lag on some versions).
    if state.get("OOMKilled") or (code != 0 and oom_kills > 0):
        out.status = Status.memory_limit
        return
    if sig is signal.SIGXCPU:
        out.status = Status.cpu_limit
        return
    if sig is signal.SIGKILL and lim.cpu_s is not None and cpu_ns >= lim.cpu_s * 1e9:
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


