"""Content-addressed Python environments on the worker host, shared by its workers.

Layout under the cache root (``SANDMILL_PYDEPS_DIR``; default /var/cache/sandmill/pydeps
as root, visible in every backend's mount namespace, which masks /tmp, /root, /home)::

    envs/<cp311-x86_64>-<sha of lock>/   one installed lock (a --target tree), read-only
    meta/<key>.flock                     its lock file: shared while a job uses the env,
                                         exclusive while it is installed or evicted;
                                         its mtime is the env's last use (LRU)
    meta/<key>.size                      bytes installed
    locks/<sha of requirements>.txt      resolutions, reused for SANDMILL_PYDEPS_LOCK_TTL_S
    uv-cache/                            the installer's download cache

An env is built by the worker, outside any sandbox, into a temporary directory renamed
into place when complete, with no write bit for group or others (jobs run as another
uid: they can read it, never change it). Concurrent workers install a lock once: the
first takes the exclusive flock and installs, the others wait on it and find it done.
Past ``SANDMILL_PYDEPS_MAX_MB`` the least recently used envs that no job holds (an
exclusive flock taken without waiting) are removed.

All of it blocks: the worker runs it in a thread, except ``try_hold``.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import stat
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import tools


def default_root() -> Path:
    """The cache root: SANDMILL_PYDEPS_DIR, else /var/cache/sandmill/pydeps (as root) or
    the user's cache dir."""
    if os.environ.get("SANDMILL_PYDEPS_DIR"):
        return Path(os.environ["SANDMILL_PYDEPS_DIR"])
    if os.geteuid() == 0:
        return Path("/var/cache/sandmill/pydeps")
    return Path(os.path.expanduser("~/.cache/sandmill/pydeps"))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Held:
    """An environment a job uses: the shared flock keeps it from eviction until release."""

    key: str
    path: str
    fd: int
    installed: bool = False  # this call installed it (the first job of a new lock)
    log: str = ""

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # drops the shared flock
            self.fd = -1


@dataclass
class EnvCache:
    """The environments under ``root``, at most ``max_bytes`` of them kept unused."""

    root: Path = field(default_factory=default_root)
    max_bytes: int = field(default_factory=lambda: int(float(os.environ.get("SANDMILL_PYDEPS_MAX_MB", 4096)) * 2**20))
    lock_ttl_s: float = field(default_factory=lambda: float(os.environ.get("SANDMILL_PYDEPS_LOCK_TTL_S", 3600)))
    installs: int = 0  # installs done by this process (tests and the benchmark read it)
    _touched: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        for sub in ("envs", "meta", "locks", "tmp", "uv-cache"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # jobs (another uid) must reach envs/: every directory above it traversable
        for d in (self.root, self.root / "envs"):
            os.chmod(d, 0o755)
        for d in (self.root / "meta", self.root / "locks", self.root / "tmp", self.root / "uv-cache"):
            os.chmod(d, 0o700)

    # ---- keys -----------------------------------------------------------------------

    def key(self, lock: str, target: tools.Target) -> str:
        """The env's name: the target and the hash of the lock."""
        return f"{target.tag}-{_sha(lock)[:24]}"

    def env_path(self, key: str) -> Path:
        return self.root / "envs" / key

    # ---- resolving ------------------------------------------------------------------

    def resolve(self, requirements: str, target: tools.Target) -> tuple[str, str, bool]:
        """The lock for ``requirements``: a fresh resolution (under a flock, so concurrent
        workers resolve once), or this host's own from the last ``lock_ttl_s``.
        Returns (lock, log, reused); raises tools.ToolError."""
        name = _sha(f"{target.tag}\n{requirements}")[:32]
        path = self.root / "locks" / f"{name}.txt"
        fd = os.open(self.root / "locks" / f"{name}.flock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if time.time() - path.stat().st_mtime < self.lock_ttl_s:
                    return path.read_text(), "", True
            except FileNotFoundError:
                pass
            lock, log = tools.resolve(requirements, target, cache=str(self.root / "uv-cache"))
            tmp = path.with_suffix(f".{uuid.uuid4().hex}")
            tmp.write_text(lock)
            os.replace(tmp, path)
            return lock, log, False
        finally:
            os.close(fd)

    # ---- holding an env -------------------------------------------------------------

    def _open(self, key: str) -> int:
        return os.open(self.root / "meta" / f"{key}.flock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def try_hold(self, key: str) -> Held | None:
        """The env if it is installed and nobody installs or evicts it now, without
        waiting (the event loop's fast path); None otherwise."""
        fd = self._open(key)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if self.env_path(key).is_dir():
            self._touch(key, fd)
            return Held(key, str(self.env_path(key)), fd)
        os.close(fd)
        return None

    def hold(self, lock: str, target: tools.Target, on_log: Callable[[str], None] | None = None) -> Held:
        """The env of ``lock``, installed first if needed (once across workers), held
        shared until ``release``. Raises tools.ToolError when the install fails."""
        key = self.key(lock, target)
        path = self.env_path(key)
        fd = self._open(key)
        installed, log = False, ""
        try:
            while True:
                fcntl.flock(fd, fcntl.LOCK_SH)
                if path.is_dir():
                    self._touch(key, fd)
                    return Held(key, str(path), fd, installed, log)
                # not there: take it exclusively (released first, so two upgraders cannot
                # deadlock) and install unless another worker did meanwhile
                fcntl.flock(fd, fcntl.LOCK_UN)
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not path.is_dir():
                    log = self._install(key, lock, target, on_log)
                    installed = True
                fcntl.flock(fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(fd)
            raise

    def _install(self, key: str, lock: str, target: tools.Target, on_log: Callable[[str], None] | None) -> str:
        tmp = self.root / "tmp" / f"{key}.{uuid.uuid4().hex[:8]}"
        try:
            log = tools.install(lock, target, str(tmp), cache=str(self.root / "uv-cache"))
            (tmp / ".lock").unlink(missing_ok=True)  # uv's own install lock, mode 666
            size = _seal(tmp)
            os.chmod(tmp, 0o755)
            os.rename(tmp, self.env_path(key))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        (self.root / "meta" / f"{key}.size").write_text(str(size))
        self.installs += 1
        if on_log:
            on_log(log)
        self.evict(keep=key)
        return log

    def _touch(self, key: str, fd: int) -> None:
        """Stamp the env's last use (at most once a minute per env and process)."""
        now = time.monotonic()
        if now - self._touched.get(key, -1e9) > 60:
            self._touched[key] = now
            os.utime(fd)

    # ---- eviction -------------------------------------------------------------------

    def usage(self) -> list[tuple[float, str, int]]:
        """(last use, key, bytes) of every installed env, least recently used first."""
        out = []
        for size_file in (self.root / "meta").glob("*.size"):
            key = size_file.name[:-5]
            try:
                size = int(size_file.read_text() or 0)
                last = (self.root / "meta" / f"{key}.flock").stat().st_mtime
            except (OSError, ValueError):
                continue
            out.append((last, key, size))
        return sorted(out)

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove the least recently used envs no job holds until the rest fit in
        ``max_bytes``; returns the keys removed."""
        envs = self.usage()
        total = sum(size for _, _, size in envs)
        removed = []
        for _, key, size in envs:
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            fd = self._open(key)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a job uses it
                os.close(fd)
                continue
            try:
                trash = self.root / "tmp" / f"evicted-{key}.{uuid.uuid4().hex[:8]}"
                if self.env_path(key).is_dir():
                    os.rename(self.env_path(key), trash)
                (self.root / "meta" / f"{key}.size").unlink(missing_ok=True)
            finally:
                os.close(fd)  # the flock file itself stays: its inode is the lock
            shutil.rmtree(trash, ignore_errors=True)
            total -= size
            removed.append(key)
        return removed


def _seal(tree: Path) -> int:
    """Take every write bit but the owner's (root's) off ``tree``; return its bytes."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                continue
            os.chmod(p, 0o755 if st.st_mode & 0o111 else 0o644)
            total += st.st_size
    return total
