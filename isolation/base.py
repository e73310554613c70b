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
