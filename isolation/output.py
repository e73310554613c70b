"""Capped, EOF-independent reading of a job's stdout/stderr.

Each stream is a pipe we create ourselves (not asyncio's subprocess pipes), read with
``loop.add_reader`` in fixed-size chunks: memory stays bounded by the cap even for one
endless line, and we can stop reading whenever we decide the job is over, even if a
daemonized descendant still holds the write end open.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from .base import OutputCallback

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


class CappedStream:
    """Reads one pipe's read end. Keeps at most ``cap`` bytes; the first byte past the cap
    sets ``truncated``, calls ``on_overflow`` once (the backend kills the job) and stops
    reading. Every kept chunk is forwarded to ``on_output(name, chunk)``."""

    def __init__(self, name: str, fd: int, cap: int, on_output: OutputCallback | None,
                 on_overflow: Callable[[], None]) -> None:
        self.name = name
        self.fd = fd
        self.cap = cap
        self.buf = bytearray()
        self.truncated = False
        self._on_output = on_output
        self._on_overflow = on_overflow
        self._loop = asyncio.get_running_loop()
        self.done: asyncio.Future[None] = self._loop.create_future()
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> bool:
        """Read one chunk (the loop's callback); False when nothing was there yet."""
        try:
            data = os.read(self.fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data = b""
        if not data:
            self.close()
            return True
        room = self.cap - len(self.buf)
        over = len(data) > room
        if over:
            data = data[:room]
        if data:
            self.buf += data
            if self._on_output is not None:
                try:
                    self._on_output(self.name, data)
                except Exception:  # a broken log sink must not break the job
                    log.exception("on_output callback failed")
        if over:
            self.truncated = True
            self.close()  # nothing more to keep: the job is being killed anyway
            self._on_overflow()
        return True

    def read_now(self, max_reads: int = 4) -> None:
        """Read what is there now, up to ``max_reads`` chunks (EOF included), without
        waiting for the loop to report it: at the job's end its pipes are mostly at EOF
        already, and the wait for that report costs loop turns."""
        for _ in range(max_reads):
            if self.fd < 0 or not self._readable():
                return

    def close(self) -> None:
        """Stop reading and close our end (idempotent). A writer then gets EPIPE."""
        if self.fd < 0:
            return
        self._loop.remove_reader(self.fd)
        os.close(self.fd)
        self.fd = -1
        if not self.done.done():
            self.done.set_result(None)


async def drain(streams: list[CappedStream], grace: float) -> None:
    """Wait up to ``grace`` seconds for EOF on every stream, then close them regardless:
    called once the main process has exited and the sandbox is swept, so whatever is
    still open is held by something we will not wait for."""
    for s in streams:
        s.read_now()
    pending = [s.done for s in streams if not s.done.done()]
    if pending:
        await asyncio.wait(pending, timeout=grace)
    for s in streams:
        s.close()


def open_pipe() -> tuple[int, int]:
    """(read_fd, write_fd); both close-on-exec (the write end is dup'ed onto 1/2)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    return r, w
