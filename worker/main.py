"""The worker process: its event loop, child watcher and garbage collector set up for
many short jobs, the signals that stop it, and its exit code."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Callable

from sandmill.profiles import Profile

from . import eventloop
from .settings import WorkerInitError, WorkerSettings, WorkerStartError
from .worker import Worker

log = logging.getLogger("sandmill.worker")


def fast_child_watcher() -> None:
    """On Python 3.11, wait for job processes through pidfds instead of a thread per
    child (the default watcher's thread start is paid by every job). 3.12 does this
    by itself."""
    if sys.version_info < (3, 12) and hasattr(asyncio, "PidfdChildWatcher"):
        try:
            w = asyncio.PidfdChildWatcher()
            w.attach_loop(asyncio.get_running_loop())
            asyncio.set_child_watcher(w)
        except OSError:  # kernel without pidfd_open
            pass


def freeze_startup_objects() -> None:
    """Leave what the worker has built by now (modules, the pool, the profile) out of
    every garbage collection to come: a collection stops the whole process, and walking
    those costs milliseconds (docs/performance.md ("Worker"), "GC freeze"). The cycles left from
    start-up are collected first, not kept for good."""
    gc.collect()
    gc.freeze()


def serve(make: Callable[[], Worker], what: str, exit_code: Callable[[Worker], int] = lambda w: 0) -> int:
    """Run the worker ``make`` builds until SIGTERM/SIGINT, on sandmill's event loop.
    Returns ``exit_code(worker)``; 2 when it cannot start, 3 when the group's init script
    failed. ``what`` names it in the log ("worker NAME")."""

    async def main() -> int:
        fast_child_watcher()
        try:
            w = make()
        except WorkerStartError as e:
            log.error("%s cannot start: %s", what, e)
            return 2
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, w.stop)
        try:
            await w.run(on_started=freeze_startup_objects)
        except WorkerStartError as e:
            log.error("%s cannot start: %s", what, e)
            return 2
        except WorkerInitError as e:
            log.error("%s: %s; exiting", what, e)
            print(f"sandmill worker: {e}. Its logs:\n{e.logs.rstrip()}", file=sys.stderr, flush=True)
            return 3
        return exit_code(w)

    with asyncio.Runner(loop_factory=eventloop.new_event_loop) as runner:
        return runner.run(main())


def run_worker(profile: Profile, database_url: str, settings: WorkerSettings | None = None) -> int:
    """Entry point of `sandmill worker`: run until SIGTERM/SIGINT. Returns the exit code:
    0, 2 when the worker cannot start, 3 when the group's init script failed."""
    return serve(lambda: Worker(profile, database_url, settings=settings), f"worker {profile.name}")
