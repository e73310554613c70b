"""The job's stdio over Docker's attach socket: feed stdin then EOF, and demultiplex
stdout/stderr through per-stream byte caps.

Runs in plain threads (the SDK's socket is blocking). Without a TTY the Engine API frames
output as ``[stream(1) 0 0 0 size(4, big endian)] payload``; 1 = stdout, 2 = stderr.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
_HEADER = struct.Struct(">BxxxL")
_NAMES = {1: "stdout", 2: "stderr"}


def feed_stdin(sock: socket.socket, data: bytes) -> None:
    """Write ``data`` then half-close, which Docker turns into EOF on the job's stdin
    (the container is created with StdinOnce). A job that exits without reading makes
    the write fail: that is fine, it did not want its input."""
    try:
        if data:
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def start_stdin_writer(sock: socket.socket, data: bytes) -> threading.Thread:
    """Feed stdin from its own thread so a large input cannot deadlock against output
    the job writes before it reads everything."""
    t = threading.Thread(target=feed_stdin, args=(sock, data), name="sandmill-docker-stdin", daemon=True)
    t.start()
    return t


class Demux:
    """Reads the attach socket to EOF, keeping at most ``cap`` bytes of each stream.

    The first byte past a stream's cap sets its truncated flag and calls ``on_overflow``
    once (the backend kills the container) and reading stops: draining a flood to EOF
    through dockerd costs seconds, and nothing more would be kept anyway. ``emit(name, chunk)`` gets every kept chunk as it arrives.
    """

    def __init__(self, sock: socket.socket, cap: int, emit: Callable[[str, bytes], None] | None,
                 on_overflow: Callable[[], None]) -> None:
        self.sock = sock
        self.cap = cap
        self.emit = emit
        self.on_overflow = on_overflow
        self.out = {"stdout": bytearray(), "stderr": bytearray()}
        self.truncated = {"stdout": False, "stderr": False}
        self.overflowed = False

    def _keep(self, name: str, data: bytes) -> None:
        buf = self.out[name]
        room = self.cap - len(buf)
        if len(data) > room:
            data = data[:room]
            self.truncated[name] = True
        if data:
            buf += data
            if self.emit is not None:
                try:
                    self.emit(name, data)
                except Exception:  # a broken log sink must not break the job
                    log.exception("on_output callback failed")
        if self.truncated[name] and not self.overflowed:
            self.overflowed = True
            self.on_overflow()

    def run(self) -> None:
        """Blocking: returns at EOF (the container exited or the socket was closed) or
        at the first overflow."""
        try:
            self._read()
        finally:
            if self.overflowed:
                # Stop dockerd's copy into a socket nobody reads: a container's exit
                # waits for its attach streams, so a full socket would stall the kill.
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _read(self) -> None:
        pending = bytearray()
        while True:
            try:
                data = self.sock.recv(CHUNK)
            except OSError:
                data = b""
            if not data or self.overflowed:
                return
            pending += data
            # Hand over partial frame payloads at once: an endless line must stream and
            # must not grow memory past the cap while we wait for its frame to end.
            while len(pending) >= _HEADER.size:
                kind, size = _HEADER.unpack_from(pending)
                body = pending[_HEADER.size:_HEADER.size + size]
                name = _NAMES.get(kind)
                if len(body) < size:
                    if name is not None and body:
                        self._keep(name, bytes(body))
                        if self.overflowed:
                            return
                        # Rewrite the header so the rest of this frame follows it.
                        _HEADER.pack_into(pending, 0, kind, size - len(body))
                        del pending[_HEADER.size:]
                    break
                if name is not None:
                    self._keep(name, bytes(body))
                del pending[:_HEADER.size + size]
                if self.overflowed:
                    return


def in_loop(loop: asyncio.AbstractEventLoop, cb: Callable[[str, bytes], None]) -> Callable[[str, bytes], None]:
    """``cb`` called from the reader thread but run in the event loop, in order."""
    def emit(name: str, chunk: bytes) -> None:
        loop.call_soon_threadsafe(cb, name, chunk)
    return emit
