"""A worker's occupancy over the last 15 s, 5 min and 30 min: the share of its slots'
time spent running jobs (busy slot-seconds / (elapsed seconds x subworkers)), sent in
its ping for the autoscaler (server/autoscale).

It keeps the cumulative busy time B(t) (jobs ended, plus the part run so far of the jobs
running) at each sample, one per ping; a window's busy time is B(now) - B(now - window),
B read between two samples by linear interpolation. A worker younger than a window is
measured over its life. 30 min of 15 s pings is 120 samples."""

from __future__ import annotations

import bisect
import time
from collections import deque
from typing import Callable, Iterable

WINDOWS_S = (15.0, 300.0, 1800.0)


class Occupancy:
    """The cumulative busy time of a worker's slots, sampled; ``sample()`` gives the three
    windows' occupancy."""

    def __init__(self, subworkers: int, clock: Callable[[], float] = time.monotonic,
                 windows_s: tuple[float, ...] = WINDOWS_S):
        self.subworkers = max(1, subworkers)
        self.clock = clock
        self.windows_s = windows_s
        self.completed_s = 0.0  # busy seconds of the jobs that ended (added by the worker)
        start = clock()
        self._t: deque[float] = deque([start])  # sample times
        self._b: deque[float] = deque([0.0])    # cumulative busy seconds at those times

    def add_completed(self, busy_s: float) -> None:
        """Count the run time of jobs that ended (their whole run)."""
        self.completed_s += max(0.0, busy_s)

    def sample(self, running_t0: Iterable[float] = ()) -> tuple[float, ...]:
        """Record B(now) and return the occupancy of each window (0..1). ``running_t0``:
        the start times (same clock) of the jobs running now."""
        now = self.clock()
        busy = self.completed_s + sum(max(0.0, now - t0) for t0 in running_t0)
        busy = max(busy, self._b[-1])  # never backwards (a job's start and end clocks differ by a hair)
        if now > self._t[-1]:
            self._t.append(now)
            self._b.append(busy)
        else:
            self._b[-1] = busy
        horizon = now - max(self.windows_s)
        while len(self._t) > 2 and self._t[1] <= horizon:  # keep one sample at or before it
            self._t.popleft()
            self._b.popleft()
        return tuple(self._window(now, busy, w) for w in self.windows_s)

    def _window(self, now: float, busy: float, window_s: float) -> float:
        start = max(now - window_s, self._t[0])
        elapsed = now - start
        if elapsed <= 0:
            return 0.0
        occ = (busy - self._busy_at(start)) / (elapsed * self.subworkers)
        return min(1.0, max(0.0, occ))

    def _busy_at(self, t: float) -> float:
        """B(t), linear between the samples around ``t``."""
        ts = self._t
        i = bisect.bisect_right(ts, t)
        if i == 0:
            return self._b[0]
        if i >= len(ts):
            return self._b[-1]
        t0, t1 = ts[i - 1], ts[i]
        b0, b1 = self._b[i - 1], self._b[i]
        return b0 + (b1 - b0) * (t - t0) / (t1 - t0) if t1 > t0 else b1
