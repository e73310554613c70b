"""Which read-only mounts a warm job process can bind itself (``warm_mounts_problem``)
and the mount roots it masks (``existing_dirs``); the rest of the warm path is warm.py."""

from __future__ import annotations

import os
import stat

from .spec import Mount

__all__ = ["existing_dirs", "warm_mounts_problem"]


def existing_dirs(paths: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The absolute, normalised directories of ``paths`` (mount roots: one that does not
    exist cannot be bound, and has nothing to hide)."""
    return tuple(p for p in paths if os.path.isabs(p) and os.path.normpath(p) == p and os.path.isdir(p))


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _beneath(path: str, root: str) -> bool:
    """``path`` is under ``root`` and no symlink below the root leads it elsewhere."""
    if not _under(path, root):
        return False
    real_root = os.path.realpath(root)
    return os.path.realpath(path) == os.path.normpath(
        os.path.join(real_root, os.path.relpath(path, root)))


def warm_mounts_problem(mounts: list[Mount], roots: tuple[str, ...], *,
                        self_binds: bool = False, job_dir: str | None = None) -> str | None:
    """Why a warm job process cannot make ``mounts`` (the job then runs cold), or None.
    It binds read-only directories and regular files whose source lies under one of the
    pool's mount roots (which its zygote sees and each job masks), or, with
    ``self_binds``, a path onto itself (the process backend's zygote sees the host as
    is). Writable mounts, device nodes and other sources stay on the cold path."""
    for m in mounts:
        if m.writable:
            return f"mount {m.target!r} is writable"
        try:
            mode = os.stat(m.source).st_mode
        except OSError as e:
            return f"mount source {m.source!r}: {e.strerror}"
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
            return f"mount source {m.source!r} is not a directory or a regular file"
        if job_dir is not None and _under(m.target, job_dir):
            return f"mount target {m.target!r} is in the job's dir"
        if any(_beneath(m.source, r) for r in roots):
            continue
        if not (self_binds and m.source == m.target):
            return f"mount source {m.source!r} is outside the warm mount roots {list(roots)}"
    return None
