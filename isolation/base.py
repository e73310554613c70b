"""The one interface every backend implements."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field

from .spec import Outcome, RunSpec

# Called with ("stdout" | "stderr", chunk) as output arrives, so the worker can stream logs.
OutputCallback = Callable[[str, bytes], None]


@dataclass
class Probe:
    """What a backend can do on this host. ``gaps`` names each guarantee it cannot give
    here (keys are the conformance-suite case names), with the reason."""

    backend: str
    available: bool
    reason: str = ""
    gaps: dict[str, str] = field(default_factory=dict)


class Prepared:
    """A job's set-up made ahead by ``Backend.prepare`` while the job before it runs. The
    run it was made for takes it (``run(spec, on_output, prepared=...)``, the same spec
    object); ``discard`` frees what it holds, and is a no-op once a run took it."""

    def discard(self) -> None:
        """Free what the set-up holds (work dir, reservations); idempotent."""


class Backend(abc.ABC):
    """Runs one RunSpec in a fresh sandbox.

    Cancelling the task that awaits ``run`` kills everything the job started and cleans
    up before the CancelledError propagates.
    """

    name: str

    @abc.abstractmethod
    def probe(self) -> Probe:
        """Say whether this backend works here and what it cannot enforce."""

    @abc.abstractmethod
    async def run(self, spec: RunSpec, on_output: OutputCallback | None = None) -> Outcome:
        """Run ``spec`` and return its Outcome. Never raises for a job's own failure."""

    def prepare(self, spec: RunSpec, lane: object) -> Prepared | None:
        """Optional: start ``spec``'s set-up now, while the job before it runs in ``lane``
        (the task that runs both, one after the other), so that its run only starts it.
        Nothing of the job runs before its own run. None: nothing to prepare here."""
        return None

    def close(self) -> None:  # optional: most backends hold nothing
        """Release what the backend keeps between runs (warm interpreters, clients)."""


# The conformance suite's cases (tests/isolation/test_conformance.py, one test each,
# named test_<case>). A probe's ``gaps`` uses these keys, and one more for GPU jobs only:
# ``gpu_device_cgroup`` (isolation/devices_cgroup.py; tests/test_gpu_devcg.py).
CONFORMANCE_CASES: dict[str, str] = {
    "wall_timeout": "a job past limits.wall_s is killed: status timeout",
    "cpu_limit": "a busy loop past limits.cpu_s is killed: status cpu_limit",
    "cpu_cores": "busy processes with limits.cpu_cores 0.5 get about half a core, all together",
    "memory_limit_children": "a child allocating past limits.memory_mb: status memory_limit",
    "fork_bomb": "forking stops at limits.pids; the host can still fork",
    "output_flood": "endless stdout is capped at limits.output_bytes: output_limit, truncated",
    "output_endless_line": "one endless line (no newline) is capped the same way",
    "file_size_limit": "writing a file past limits.file_size_mb fails",
    "tmp_size_limit": "writing past limits.tmp_mb into /tmp fails",
    "system_dirs_readonly": "writing /usr or /etc fails",
    "no_worker_env": "the job sees spec.env only, nothing of the worker's environment",
    "no_outside_files": "the job cannot read files outside its work dir (root-only, test tmp)",
    "no_network": "network none: connecting to a port on the host's 127.0.0.1 fails",
    "no_descendant_survives": "a double-forked daemon holding stdout dies; run returns promptly",
    "fresh_workdir": "each job starts in a fresh, empty work dir",
    "binary_output_intact": "4 MiB of random bytes come back intact via stdout and collect",
    "stdin_eof": "stdin is spec.stdin then EOF",
    "exit_nonzero": "a non-zero exit is exit_nonzero with its code",
    "signalled": "SIGSEGV is signalled with signal SIGSEGV",
    "cancel": "cancelling the run task kills every process of the job",
}
