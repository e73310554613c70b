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


_ready_roots: set[Path] = set()  # roots this process made 0711 (once, not per job)


def create(root: Path, files: dict[str, bytes], uid: int | None, gid: int | None) -> Path:
    """A fresh, empty dir under ``root`` holding ``files``; owned by uid:gid when given.
    ``root`` is 0711 so jobs (all one uid) cannot list each other's dirs."""
    if root not in _ready_roots:
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o711)
        _ready_roots.add(root)
    # os calls on str paths, not mkdtemp and pathlib: a job's dir is made on every job's
    # path (docs/performance.md, "Round 3"); the name is as unguessable as mkdtemp's
    base = str(root)
    for _ in range(100):
        path = f"{base}/job-{os.urandom(6).hex()}"
        try:
            os.mkdir(path, 0o700)
            break
        except FileExistsError:
            continue
        except FileNotFoundError:  # the root went away since: make it again
            _ready_roots.discard(root)
            return create(root, files, uid, gid)
    else:
        raise FileExistsError(f"no free work dir name under {base}")
    wd = Path(path)
    try:
        owner = uid is not None
        gid_ = gid if gid is not None else -1
        for name, data in files.items():
            rel = _rel(name)
            d = path
            for part in rel.parts[:-1]:  # its parent dirs, made (and chowned) once
                d = f"{d}/{part}"
                try:
                    os.mkdir(d, 0o777)
                except FileExistsError:
                    if not os.path.isdir(d):
                        raise
                    continue
                if owner:
                    os.chown(d, uid, gid_)
            # O_EXCL|O_NOFOLLOW: the dir is fresh and ours, nothing in it may be followed
            fd = os.open(f"{d}/{rel.parts[-1]}",
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            try:
                if data:
                    _write_all(fd, data)
                if owner:
                    os.fchown(fd, uid, gid_)
            finally:
                os.close(fd)
        if owner:  # only what we made is chowned (no walk of the dir)
            os.chown(path, uid, gid_)
    except BaseException:
        remove(wd)
        raise
    return wd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def collect(wd: Path, names: list[str], cap: int) -> dict[str, bytes]:
    """Read back each named regular file (first ``cap`` bytes). Missing files, non-regular
    files and paths through symlinks are skipped."""
    out: dict[str, bytes] = {}
    if not names:  # nothing to read back (a bash job): no path walk
        return out
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
    """Delete the work dir (best effort; never raises). Once every job process is dead;
    a dir holding only files (the usual job) goes by its names, relative to the dir's fd
    (no path is followed: a job may have left symlinks), in a third of rmtree's system
    calls; anything else (a subdir) by rmtree."""
    try:
        fd = os.open(wd, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError:
        shutil.rmtree(wd, ignore_errors=True)  # a symlink or gone: rmtree refuses or has nothing
        return
    try:
        for name in os.listdir(fd):
            try:
                os.unlink(name, dir_fd=fd)
            except IsADirectoryError:
                break  # a subdir: rmtree below takes the rest
            except OSError:
                pass
    finally:
        os.close(fd)
    try:
        os.rmdir(wd)
    except OSError:
        shutil.rmtree(wd, ignore_errors=True)


# ---- leftovers of dead workers -----------------------------------------------------------
# A worker keeps its work dirs under a root of its own, w-<pid ns>-<pid>-<start time>, so
# that once it is dead (SIGKILL: no cleanup ran) a later worker can tell its dirs apart
# from a live worker's: the pid no longer runs, or runs a process with another start time.


def owner_root(root: Path) -> Path:
    """This process's own work dir root under the shared ``root``."""
    return root / f"w-{owner_id()}"


def owner_id(pid: int | None = None) -> str:
    """``<pid ns>-<pid>-<start time>`` of process ``pid`` (default: this one): names its
    owner in a way that stays true after the pid is reused (work dirs, containers)."""
    pid = os.getpid() if pid is None else pid
    return f"{_pid_ns()}-{pid}-{_start_time(pid)}"


def owner_dead(owner: str) -> bool:
    """True when ``owner`` (an ``owner_id``) names a process of our pid namespace that no
    longer runs. False when it runs, or for another namespace's (its pids mean nothing
    here) and for anything unparsable: only a sure death lets a sweep remove things."""
    parts = owner.split("-")
    if len(parts) != 3 or parts[0] != _pid_ns() or not parts[1].isdigit():
        return False
    return _start_time(int(parts[1])) != parts[2]


def shared_root(root: Path) -> Path:
    """The root every worker's work dirs share: ``root``'s parent when ``root`` is a
    worker's own (``owner_root``), else ``root`` itself."""
    parts = root.name.split("-")
    return root.parent if len(parts) == 4 and parts[0] == "w" else root


def _pid_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").partition("[")[2].rstrip("]") or "0"
    except OSError:
        return "0"


def _start_time(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks since boot; None when it does not run."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def sweep_stale(root: Path, older_than_s: float = 60.0) -> list[Path]:
    """Remove the worker roots under ``root`` whose worker is dead, untouched for
    ``older_than_s`` (jobs a dead worker left running get that long). Roots of another
    pid namespace (a worker in another container) are left alone: their pids mean
    nothing here. Returns what it removed."""
    import time

    ns, removed = _pid_ns(), []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for d in entries:
        parts = d.name.split("-")
        if len(parts) != 4 or parts[0] != "w" or parts[1] != ns or not parts[2].isdigit():
            continue
        if _start_time(int(parts[2])) == parts[3]:
            continue  # its worker runs
        try:
            st = d.lstat()
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and time.time() - st.st_mtime >= older_than_s:
            remove(d)
            removed.append(d)
    return removed
