"""A Docker job's work dir on the host: made fresh with the job's files, owned by the
job's uid, bind-mounted at /work; files collected back symlink-safe (we read as root
what the job wrote)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile


def _safe_rel(name: str) -> str:
    rel = os.path.normpath(name)
    if os.path.isabs(rel) or rel == "." or rel.startswith(".." + os.sep) or rel == "..":
        raise ValueError(f"file name {name!r} escapes the work dir")
    return rel


def make_workdir(files: dict[str, bytes], uid: int, root: str | None) -> str:
    """A fresh, empty dir with ``files`` in it, owned by the job's uid (when we are
    root) so the job can write next to them."""
    try:
        d = tempfile.mkdtemp(prefix="sandmill-docker-", dir=root)
    except FileNotFoundError:  # a root not made yet (or removed since): 0711, as workdir.create's
        if root is None:
            raise
        os.makedirs(root, mode=0o711, exist_ok=True)
        d = tempfile.mkdtemp(prefix="sandmill-docker-", dir=root)
    try:
        for name, data in files.items():
            path = os.path.join(d, _safe_rel(name))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
        if os.geteuid() == 0:
            for base, dirs, names in os.walk(d):
                for n in [*dirs, *names]:
                    os.lchown(os.path.join(base, n), uid, uid)
            os.chown(d, uid, uid)
        else:
            os.chmod(d, 0o777)  # not root: cannot chown; let the job's uid write
        return d
    except BaseException:
        shutil.rmtree(d, ignore_errors=True)
        raise


def collect(workdir: str, names: list[str], cap: int) -> dict[str, bytes]:
    """Read back ``names`` (missing ones are skipped), each capped at ``cap`` bytes.

    We read as root what the job wrote: a symlink (even in a parent component) must not
    lead outside the work dir, so resolve it and open with O_NOFOLLOW.
    """
    got: dict[str, bytes] = {}
    real_root = os.path.realpath(workdir)
    for name in names:
        try:
            path = os.path.join(workdir, _safe_rel(name))
        except ValueError:
            continue
        real = os.path.realpath(path)
        if os.path.commonpath([real, real_root]) != real_root:
            continue
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue  # a FIFO or device would block or lie
            chunks, left = [], cap
            while left > 0:
                b = os.read(fd, min(left, 1 << 20))
                if not b:
                    break
                chunks.append(b)
                left -= len(b)
            got[name] = b"".join(chunks)
        finally:
            os.close(fd)
    return got
