"""The warm zygote's protocol pieces the worker holds: the errors, the job's message
(``JobRequest``), a job process forked ahead and its own socket (``JobProc``), and one
message read off a socket with its sender's pid. ``warm_zygote.Zygote`` drives them."""

from __future__ import annotations

import asyncio
import collections
import os
import socket
import struct
from dataclasses import dataclass, field

from .cgroups import JobCgroup


def sender_pid(anc: list[tuple[int, int, bytes]]) -> int | None:
    """The sender's pid (in our pid namespace) from a message's SCM_CREDENTIALS, if any."""
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            return struct.unpack("iII", payload[:12])[0]
    return None


class WarmError(RuntimeError):
    """The warm path failed before any job code ran: the caller may run the job cold."""


class WarmSetupError(WarmError):
    """A job process could not set itself up (e.g. the kernel forbids unprivileged user
    namespaces): no warm run will work here."""


class WarmMountError(WarmError):
    """The job process could not make this job's mounts (e.g. a target that does not
    exist in the warm sandbox): this job runs cold, the zygote stays usable."""


def _set_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class JobRequest:
    """What the job process needs to know (sent to the zygote's child, never to it)."""

    dir: str  # the job's dir as the zygote sees it
    mount: str  # the shared jobs dir, where the job dir is bound (its cwd)
    argv: list[str]
    env: dict[str, str]
    rlimits: list[tuple[int, int, int]]
    tmp_bytes: int | None
    hostname: str | None = None
    exec: list[str] | None = None  # exec this argv instead of running argv[0] in-process
    # [source, target] read-only binds, sources as the zygote sees them (warm.warm_mounts)
    mounts: list[list[str]] = field(default_factory=list)


class JobProc:
    """A job process the zygote forked ahead of its job (F), and its own socket, read as
    messages come (W, E, M, then its end: the socket closes as the job's code starts)."""

    def __init__(self, seq: int, sock: socket.socket, ended: asyncio.Future[int],
                 cgroup: JobCgroup) -> None:
        self.seq = seq  # its number in the zygote's Z messages
        self.sock = sock  # our end of its socket pair (SO_PASSCRED)
        self.ended = ended  # its wait status, from the zygote's Z
        self.cgroup = cgroup  # its job's cgroup, where it was born
        self.mnt_ns: int | None = None  # held from its W (see Zygote.after_job)
        self.pidfd: int | None = None  # from its W until its job starts (the zygote's then)
        self._checked: asyncio.Future[None] | None = None  # check()'s, made once
        self._loop = asyncio.get_running_loop()
        self.heard: asyncio.Future[None] = self._loop.create_future()  # a first message or EOF
        self._msgs: collections.deque[tuple[bytes, int | None]] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._reading = True
        self._loop.add_reader(sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                data, anc, _flags, _ = self.sock.recvmsg(8192, socket.CMSG_SPACE(12))
            except BlockingIOError:
                break
            except OSError:
                data, anc = b"", []
            self._msgs.append((data, sender_pid(anc)))
            if not data:
                self._stop_reading()
                break
        if not self.heard.done():
            self.heard.set_result(None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def check(self) -> asyncio.Future[None]:
        """Its W, checked once (a set-up ahead and its job's start await the same check):
        it waits for its job in its own job cgroup; its pidfd and mount namespace are
        then held. The future raises WarmSetupError (E) or WarmError."""
        if self._checked is None:
            self._checked = asyncio.ensure_future(self._check())
            self._checked.add_done_callback(lambda f: f.cancelled() or f.exception())
        return self._checked

    async def _check(self) -> None:
        msg, pid = await self.next()
        if msg[:1] == b"E":
            raise WarmSetupError(f"warm job setup failed: {msg[1:].decode(errors='replace')}")
        if msg != b"W" or pid is None:
            raise WarmError(f"unexpected message from the warm job process: {msg[:200]!r}")
        if self.sock.fileno() < 0:  # closed meanwhile: nothing may be held past close()
            raise WarmError("the warm job process was closed")
        self.pidfd = os.pidfd_open(pid)  # from here on, this very process
        # Its mount namespace, held: freed at its exit, it would hold up the exit (and so
        # the job's end) by an RCU grace period; freed in after_job's thread instead.
        self.mnt_ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        with open(f"/proc/{pid}/cgroup") as f:
            if self.cgroup.unique_dirs()[0].name not in f.read():
                raise WarmError("the job process is not in its job cgroup")

    async def next(self) -> tuple[bytes, int | None]:
        """Its next message and the sender's pid (in our pid namespace) when attached;
        b"" once its socket closed."""
        while not self._msgs:
            self._waiter = self._loop.create_future()
            await self._waiter
        msg = self._msgs.popleft()
        if not msg[0]:
            self._msgs.appendleft(msg)  # the end stays the end
        return msg

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self.sock.fileno())

    def take_ns(self) -> list[int]:
        fds, self.mnt_ns = [self.mnt_ns] if self.mnt_ns is not None else [], None
        return fds

    def close(self) -> None:
        for fd in self.take_ns():
            os.close(fd)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self._stop_reading()
        self._msgs.append((b"", None))  # a reader still waiting gets the end
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        if not self.heard.done():
            self.heard.set_result(None)  # a step waiting for it goes on (and finds us broken)
        try:
            self.sock.close()
        except OSError:
            pass


async def recv(sock: socket.socket) -> tuple[bytes, int | None]:
    """One message on ``sock`` (non-blocking) and the sender's pid (in our pid namespace)
    when attached; WarmError at the socket's end."""
    loop = asyncio.get_running_loop()
    fd = sock.fileno()
    while True:
        try:
            data, anc, _flags, _ = sock.recvmsg(8192, socket.CMSG_SPACE(12))
            break
        except BlockingIOError:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _set_once, readable)
            try:
                await readable
            finally:
                loop.remove_reader(fd)
    if not data:
        raise WarmError("the warm interpreter exited before it was ready")
    return data, sender_pid(anc)
