"""The control channel of a dedicated runtime, the worker's end (dedicated_runtime.py holds
the process): frames to and from templates/dedicated_runtime.py, each job's pipe for its
output, and its wall-clock timer. Frames: a header <length u32, kind u8, job id 16 bytes>,
then the body; a frame for any job but the one in front is a protocol violation that ends
the runtime (the job's own code runs in that process and could write one)."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import os
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from sandmill.isolation import Limits

HDR = struct.Struct("<IB16s")
CPU = struct.Struct("<I")  # the first bytes of a result frame (D, E, I): the job's CPU in µs
MAX_FRAME = 64 * 1024 * 1024  # a bigger frame from the runtime is a protocol violation
M, J = ord("M"), ord("J")


def now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class Sent:
    """A job sent to the runtime, in the order sent."""

    job: dict[str, Any]
    wall_s: float
    pipe: int  # read end of the job's stdout+stderr pipe
    out: bytearray = field(default_factory=bytearray)  # what it printed (capped)
    out_total: int = 0
    started: float | None = None  # monotonic, when its S came
    started_at: dt.datetime | None = None
    timer: asyncio.TimerHandle | None = None
    reading: bool = False
    cpu_ms: int = 0  # the runtime's CPU while it ran, as its result frame says


# (sent job, kind: b"D" | b"E" | b"I", body)
ResultFn = Callable[[Sent, int, bytes], None]


class Channel:
    """Sending jobs, reading frames and job output. The runtime (a subclass) sets
    ``sock``, ``limits``, ``output_cap``, ``on_result``, ``on_start``, ``on_change`` and
    provides ``kill``."""

    sock: socket.socket | None
    why: str
    limits: Limits
    output_cap: int
    on_result: ResultFn
    on_start: Callable[[Sent], None] | None
    on_change: Callable[[], None]
    kill: Callable[[str], None]  # the runtime's: end the process, ``why`` for its jobs
    _ready: asyncio.Future[None]

    def _init_channel(self) -> None:
        self.inflight: collections.deque[Sent] = collections.deque()
        self.loaded: set[str] = set()  # versions (hashes) sent to it
        self._rbuf = bytearray()
        self._wq: collections.deque[list[Any]] = collections.deque()  # [memoryview, fds]
        self._loop = asyncio.get_running_loop()
        self.jobs_done = 0

    # ---- sending ---------------------------------------------------------------------------

    def send(self, job: dict[str, Any], wall_s: float) -> Sent:
        """Send ``job`` (its version first, if this runtime has not had it)."""
        h: str = job["script_hash"]
        if h not in self.loaded:
            self.loaded.add(h)
            self._write(HDR.pack(16 + len(c := job["content"].encode("utf-8", "surrogateescape")), M, bytes(16))
                        + h.encode() + c, None)
        args = job["args"]
        body = h.encode() + (args if isinstance(args, str) else _json_dumps(args)).encode()
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        s = Sent(job, wall_s, r)
        self.inflight.append(s)
        try:
            self._write(HDR.pack(len(body), J, job["id"].bytes) + body, [w])
        finally:
            os.close(w)  # the kernel holds the copy in flight
        return s

    def unload(self, h: str) -> None:
        """Send the version again before its next job (after an import failure)."""
        self.loaded.discard(h)

    def _write(self, data: bytes, fds: list[int] | None) -> None:
        if self.sock is None:
            return  # ended: the owner re-sends what never started
        if not self._wq:
            try:
                n = self.sock.sendmsg([data], _rights(fds)) if fds else self.sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.kill("protocol")
                return
            if n == len(data):
                return
            if n:
                data, fds = data[n:], None
            self._loop.add_writer(self.sock.fileno(), self._writable)
        held = [os.dup(f) for f in fds] if fds else None  # the caller closes its own
        self._wq.append([memoryview(data), held])

    def _writable(self) -> None:
        while self._wq and self.sock is not None:
            item = self._wq[0]
            data, fds = item
            try:
                n = self.sock.sendmsg([data], _rights(fds)) if fds else self.sock.send(data)
            except BlockingIOError:
                return
            except OSError:
                self.kill("protocol")
                return
            if fds:
                for f in fds:
                    os.close(f)
                item[1] = None
            if n < len(data):
                item[0] = data[n:]
                return
            self._wq.popleft()
        if self.sock is not None:
            self._loop.remove_writer(self.sock.fileno())

    # ---- receiving -------------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self.sock
        if sock is None:
            return
        buf = self._rbuf
        while True:
            try:
                data = sock.recv(1 << 18)
            except BlockingIOError:
                break
            except OSError:
                data = b""
            if not data:
                self._loop.remove_reader(sock.fileno())
                break
            buf += data
        pos = 0
        head = HDR.size
        changed = False
        while len(buf) - pos >= head:
            n, kind, jid = HDR.unpack_from(buf, pos)
            if n > MAX_FRAME:
                self.kill("protocol")
                break
            if len(buf) - pos < head + n:
                break
            body = bytes(buf[pos + head:pos + head + n])
            pos += head + n
            changed = True
            self._frame(kind, jid, body)
        if pos:
            del buf[:pos]
        if changed:
            self._follow_output()
            self.on_change()

    def _frame(self, kind: int, jid: bytes, body: bytes) -> None:
        if self.why:  # being killed: nothing it sends counts any more
            return
        if kind == 82:  # R
            if not self._ready.done():
                self._ready.set_result(None)
            return
        q = self.inflight
        if not q or q[0].job["id"].bytes != jid:
            self.kill("protocol")  # a frame for a job that is not the one in front
            return
        s = q[0]
        if kind == 83:  # S
            if s.started is None:
                s.started = time.monotonic()
                s.started_at = now()
                s.timer = self._loop.call_later(s.wall_s, self._timeout, s)
                if self.on_start is not None:
                    self.on_start(s)
            return
        if s.started is None or len(body) < CPU.size:
            self.kill("protocol")
            return
        s.cpu_ms = CPU.unpack_from(body)[0] // 1000
        body = body[CPU.size:]
        q.popleft()
        if s.timer is not None:
            s.timer.cancel()
        self._stop_reading(s)
        self._drain(s)
        os.close(s.pipe)
        s.pipe = -1
        self.jobs_done += 1
        self.on_result(s, kind, body)

    def _timeout(self, s: Sent) -> None:
        if self.inflight and self.inflight[0] is s:
            self.kill("timeout")

    # ---- a job's output --------------------------------------------------------------------

    def _follow_output(self) -> None:
        """Read the running job's pipe while it runs (only that one can be written)."""
        if self.inflight:
            s = self.inflight[0]
            if s.started is not None and not s.reading and s.pipe >= 0:
                s.reading = True
                self._loop.add_reader(s.pipe, self._drain, s)

    def _stop_reading(self, s: Sent) -> None:
        if s.reading:
            s.reading = False
            self._loop.remove_reader(s.pipe)

    def _drain(self, s: Sent) -> None:
        while s.pipe >= 0:
            try:
                chunk = os.read(s.pipe, 65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self._stop_reading(s)
                return
            s.out_total += len(chunk)
            room = self.output_cap - len(s.out)
            if room > 0:
                s.out += chunk[:room]
            if s.out_total > self.limits.output_bytes and self.inflight and self.inflight[0] is s:
                self.kill("output")
                return


def _rights(fds: list[int] | None) -> list[tuple[int, int, bytes]]:
    import array
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds or []).tobytes())]


def _json_dumps(v: Any) -> str:
    import json
    return json.dumps(v)
