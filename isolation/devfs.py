"""A private /dev for the process backend's GPU jobs.

The process backend's job sees the host's / (read-only) in its own mount namespace, /dev
included: every /dev/nvidia<N> of the host. A job given GPU 1 must not see GPU 0's node,
so its /dev is replaced by an empty tmpfs holding only the usual character devices
(null, zero, full, random, urandom, tty), the /proc/self/fd links, an empty shm dir (the
backend mounts its tmpfs there next) and the nodes of its ``GpuGrant``, each bound from
the host. Made between fork and exec: everything is prepared here, in the parent; the
child only makes syscalls (``open_sources``, ``make``, ``seal``).
"""

from __future__ import annotations

import os

from . import linux
from .spec import GpuGrant

STANDARD = ("null", "zero", "full", "random", "urandom", "tty")
LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
         ("stderr", "/proc/self/fd/2"))
_DEV = b"/dev"


class PrivateDev:
    """The plan of one job's /dev: (host source, path inside) of each node bound in."""

    def __init__(self, grant: GpuGrant):
        nodes = [("/dev/" + n, "/dev/" + n) for n in STANDARD if os.path.exists("/dev/" + n)]
        nodes += [(m.source, m.target) for m in grant.devices]
        self.nodes = [(s.encode(), t.encode()) for s, t in nodes]
        self.links = [(target.encode(), b"/dev/" + name.encode()) for name, target in LINKS]
        self.flags = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID  # nodes stay rw

    def problem(self) -> str | None:
        """Why the plan cannot be made (a node inside /dev that is not a file name)."""
        for _, t in self.nodes:
            if os.path.dirname(t) != _DEV:
                return f"GPU node target {t.decode()!r} is not directly under /dev"
        return None

    def open_sources(self) -> list[int]:
        """In the child, before /dev is covered: an O_PATH fd per node's source."""
        return [os.open(s, os.O_PATH | os.O_CLOEXEC) for s, _ in self.nodes]

    def make(self, fds: list[int]) -> None:
        """In the child: the tmpfs over /dev, then each node bound onto an empty file."""
        linux.mount(b"tmpfs", _DEV, b"tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, b"size=64k,mode=755")
        for fd, (_, target) in zip(fds, self.nodes):
            os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            linux.mount(b"/proc/self/fd/%d" % fd, target, None, linux.MS_BIND)
            linux.mount(None, target, None, self.flags)
            os.close(fd)
        for target, link in self.links:
            os.symlink(target, link)
        os.mkdir(b"/dev/shm", 0o1777)

    def seal(self) -> None:
        """In the child, once /dev/shm is mounted: the tmpfs itself becomes read-only."""
        linux.mount(None, _DEV, None, linux.MS_REMOUNT | linux.MS_NOSUID | linux.MS_NOEXEC | linux.MS_RDONLY,
                    b"size=64k,mode=755")
