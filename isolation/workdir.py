"""The job's fresh work dir: create, fill with ``spec.files``, collect, remove.

Shared by the process and nsjail backends. Collection happens after every job process
is dead, and never follows a symlink out of the work dir (the worker is root; a job
could otherwise link ``out.txt`` to /etc/shadow).
"""

from __future__ import annotations

import os
import stat
import shutil
import tempfile
from pathlib import Path


class BadSpec(ValueError):
    """A file name in the spec escapes the work dir."""


def _rel(name: str) -> Path:
    p = Path(name)
    if p.is_absolute() or not p.parts or ".." in p.parts:
        raise BadSpec(f"file path must be relative and stay inside the work dir: {name!r}")
    return p


def default_root() -> Path:
    """Where work dirs live: /var/tmp/sandmill-jobs as root (outside /tmp, which jobs get
    as their own tmpfs), else the user's temp dir."""
    if os.geteuid() == 0:
        return Path("/var/tmp/sandmill-jobs")
    return Path(tempfile.gettempdir()) / f"sandmill-jobs-{os.geteuid()}"


def create(root: Path, files: dict[str, bytes], uid: int | None, gid: int | None) -> Path:
    """A fresh, empty dir under ``root`` holding ``files``; owned by uid:gid when given.
    ``root`` is 0711 so jobs (all one uid) cannot list each other's dirs."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o711)
    wd = Path(tempfile.mkdtemp(prefix="job-", dir=root))
    try:
        for name, data in files.items():
            rel = _rel(name)
            target = wd / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if uid is not None:
            for dirpath, dirnames, filenames in os.walk(wd):
                os.chown(dirpath, uid, gid if gid is not None else -1)
                for n in filenames:
                    os.chown(os.path.join(dirpath, n), uid, gid if gid is not None else -1)
    except BaseException:
        remove(wd)
        raise
    return wd


def collect(wd: Path, names: list[str], cap: int) -> dict[str, bytes]:
    """Read back each named regular file (first ``cap`` bytes). Missing files, non-regular
    files and paths through symlinks are skipped."""
    out: dict[str, bytes] = {}
    base = os.path.realpath(wd)
    for name in names:
        try:
            rel = _rel(name)
        except BadSpec:
            continue
        path = os.path.join(base, rel)
        if os.path.realpath(path) != path:  # a symlink somewhere on the way
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            with os.fdopen(fd, "rb", closefd=False) as f:
                out[name] = f.read(cap)
        finally:
            os.close(fd)
    return out


def remove(wd: Path) -> None:
    """Delete the work dir (best effort; never raises)."""
    shutil.rmtree(wd, ignore_errors=True)
