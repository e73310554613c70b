"""The latency of the claim and completion statements a worker sends, kept as fixed-bucket
histograms per statement name and reported with each ping (``worker.info``'s
``statement_latency``, read by server/metrics.py for
``sandmill_worker_statement_duration_seconds``).

Cheap on the hot path: the caller takes ``time.perf_counter()`` before the await and calls
``add(name, t0)`` after it; that is a bisect, two increments and an add, with nothing
allocated per job. Only statements that succeed are timed (a failed one is retried or
reported apart). The counts are cumulative since the worker started, as Prometheus
histograms are; the server sums them over a group's live workers.

Statement names (the ``statement`` label):

- ``claim``: an idle slot's claim (``pull``/``pull_many``), or a claim of jobs to hold
  ahead (``pull_many`` with ``ahead``);
- ``complete``: a completion that claims nothing (``complete_many``), also each job's own
  completion when a batch is completed job by job;
- ``complete_and_claim``: a completion that claims the next jobs in the same statement
  (``complete_and_pull``);
- ``dedicated_claim``, ``dedicated_complete``: a dedicated worker's batch claim and
  batch completion (store/dedicated.py).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from typing import Any

# Bucket upper bounds (ms, inclusive: Prometheus ``le``), 0.25 ms .. 5 s, then +Inf.
BOUNDS_MS: tuple[float, ...] = (0.25, 0.5, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000)

CLAIM = "claim"
COMPLETE = "complete"
COMPLETE_AND_CLAIM = "complete_and_claim"
DEDICATED_CLAIM = "dedicated_claim"
DEDICATED_COMPLETE = "dedicated_complete"


class Histogram:
    """Counts per bucket (not cumulative; the last is above every bound) and their sum."""

    __slots__ = ("counts", "sum_ms")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS_MS) + 1)
        self.sum_ms = 0.0

    def observe(self, ms: float) -> None:
        self.counts[bisect_left(BOUNDS_MS, ms)] += 1
        self.sum_ms += ms


class StatementTiming:
    """The histograms of one worker, by statement name."""

    def __init__(self) -> None:
        self.hists: dict[str, Histogram] = {}

    def add(self, name: str, t0: float) -> None:
        """Record a statement of ``name`` that began at ``t0`` (``time.perf_counter()``) and
        ended now."""
        ms = (time.perf_counter() - t0) * 1000.0
        h = self.hists.get(name)
        if h is None:  # once per statement name, for the worker's life
            h = self.hists[name] = Histogram()
        h.observe(ms)

    def report(self) -> dict[str, Any] | None:
        """What the ping sends: {statement: {"bounds_ms", "counts", "sum_ms"}}, or None
        before any statement was timed (the ping then leaves ``info`` as it is)."""
        if not self.hists:
            return None
        bounds = list(BOUNDS_MS)
        return {name: {"bounds_ms": bounds, "counts": list(h.counts), "sum_ms": round(h.sum_ms, 3)}
                for name, h in sorted(self.hists.items())}
