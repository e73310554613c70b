"""An asyncio event loop whose timers fire on time.

asyncio's epoll wait is whole milliseconds, rounded up, plus the kernel's timer slack: a
worker's timers (a native sleep, a lazy completion, a timeout) end late. On Linux this
loop's selector arms a timerfd (nanoseconds, no slack) for each wait that has a timeout,
in the same epoll set, so the wait ends at the timer's due time. Elsewhere, or where
timerfd is missing, it is asyncio's own loop. Figures: docs/performance.md ("Worker"), "Event loop".
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import selectors
import time
from typing import Callable

_CLOCK_MONOTONIC = 1  # the clock of time.monotonic() and so of loop.time()
_SAME_S = 20e-6  # a deadline this close to the armed one is taken as the same timer
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timerfd() -> tuple[int, Callable[[int], None]] | None:
    """A timerfd and a function that arms it ``ns`` from now (0 disarms), or None."""
    if hasattr(os, "timerfd_create"):  # Python 3.13+
        fd = os.timerfd_create(_CLOCK_MONOTONIC, flags=os.TFD_NONBLOCK | os.TFD_CLOEXEC)
        return fd, lambda ns: os.timerfd_settime_ns(fd, initial=ns)
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    if not hasattr(libc, "timerfd_create"):
        return None
    fd = libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
    if fd < 0:
        return None
    spec = _Itimerspec()  # one struct, refilled: arming is on every loop turn that waits
    ref = ctypes.byref(spec)
    settime = libc.timerfd_settime

    def arm(ns: int) -> None:
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        if settime(fd, 0, ref, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))

    return fd, arm


class PreciseEpollSelector(getattr(selectors, "EpollSelector", selectors.DefaultSelector)):  # type: ignore[misc]
    """An epoll selector whose waits end at their timeout to the microsecond.

    The timerfd is registered in the epoll set directly, not through ``register``: the
    loop never sees it (an fd with no key is skipped), and arming it again clears an
    expiry that was not read."""

    def __init__(self) -> None:
        super().__init__()
        made = _timerfd()
        if made is None:
            raise OSError("timerfd is not available")
        self._tfd, self._arm = made
        self._armed = False
        self._deadline = 0.0
        self._selector.register(self._tfd, selectors.EVENT_READ)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout > 0:
            now = time.monotonic()
            deadline = now + timeout
            # the same next timer as the last wait (each turn recomputes it from a slightly
            # later clock): the timer armed for it is still pending, keep it (a syscall less
            # on most turns of a busy loop)
            if not (self._armed and now < self._deadline and abs(deadline - self._deadline) < _SAME_S):
                self._arm(max(1, int(timeout * 1e9)))
                self._armed, self._deadline = True, deadline
            # the timerfd ends the wait; epoll's own (rounded up, a little later) is a
            # backstop only
            return super().select(timeout + 0.002)
        # a fired timer would keep the epoll set ready: disarmed before a wait with no
        # timeout; a poll (timeout 0, the loop has work: one per turn of a busy loop) ends
        # at once anyway, and the next wait with a timeout arms it anew
        if self._armed and timeout is None:
            self._arm(0)
            self._armed = False
        return super().select(timeout)

    def close(self) -> None:
        try:
            os.close(self._tfd)
        finally:
            super().close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The worker's event loop: timers on time where the platform allows it."""
    try:
        return asyncio.SelectorEventLoop(PreciseEpollSelector())
    except (OSError, AttributeError):  # not Linux, or no timerfd
        return asyncio.new_event_loop()
