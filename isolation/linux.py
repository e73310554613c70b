"""Thin ctypes wrappers for the syscalls Python 3.11's os module lacks (unshare, mount).

They are called from a preexec_fn, i.e. between fork and exec in a child of a possibly
threaded process: everything is resolved at import time so the child only makes the
raw calls (no imports, no locks).
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUTS = 0x04000000

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)
_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_mount = _libc.mount
_mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_prctl = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def unshare(flags: int) -> None:
    """unshare(2)."""
    _check(_unshare(flags), "unshare")


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int,
          data: bytes | None = None) -> None:
    """mount(2); all strings as bytes (prepared before fork)."""
    _check(_mount(source, target, fstype, flags, data), "mount")


def set_pdeathsig(sig: int) -> None:
    """Get ``sig`` when the parent (the worker) dies: no job outlives a crashed worker."""
    _check(_prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0), "prctl")
