"""One Docker run's shared state (``Job``) and the threads its blocking docker calls run
in (``in_thread``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from . import docker_cgroup as cg
from .spec import Status

T = TypeVar("T")


def in_thread(fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``fn(*args)`` in a fresh daemon thread, as a future of the running loop. Not the
    loop's default executor: its few threads are held for whole jobs by output readers
    and exit waits, and a kill queued behind them would wait for a job to end."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def target() -> None:
        try:
            r: Any = fn(*args)
            ok = True
        except BaseException as e:  # handed to the awaiting task
            r, ok = e, False
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(settle, ok, r)

    threading.Thread(target=target, name="sandmill-docker", daemon=True).start()
    return fut


@dataclass
class Job:
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
    abandoned: bool = False  # under lock: cleanup began; _setup must create or start nothing more
    exited: bool = False  # the container's exit was seen: nothing left to kill
    usage: cg.Usage = field(default_factory=cg.Usage)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        """The container's name: known before it exists, so a clean-up that races
        with its creation can still remove it."""
        return f"sandmill-{self.job_id}"
