"""The native exec zygote (``launcher.c``): built once per host with the C compiler, on
first use, into a cache dir; warm exec jobs without mounts of their own then fork from
it instead of from a Python interpreter (docs/performance.md, "Round 7: a native exec
zygote"). Where no compiler is found, or ``SANDMILL_LAUNCHER=0``, they use the Python
exec zygote as before: same guarantees, more CPU per job."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from .warm_proto import JobRequest, WarmError

__all__ = ["build", "cache_dir", "compile_cached", "encode"]

log = logging.getLogger(__name__)

SOURCE = resources.files("sandmill.isolation").joinpath("launcher.c").read_bytes()
# Static: nothing to load at its start, and it runs in any sandbox's file system.
FLAGS = ("-O2", "-static", "-Wall")
BUILD_TIMEOUT_S = 120.0
MASK64 = (1 << 64) - 1


def cache_dir() -> Path:
    """Where built launchers are kept: ``SANDMILL_CACHE_DIR``, else /var/cache/sandmill
    for root (the job uid must be able to run it: the dirs are world-readable), else
    ~/.cache/sandmill."""
    env = os.environ.get("SANDMILL_CACHE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/sandmill")
    return Path.home() / ".cache" / "sandmill"


@functools.cache
def build() -> str | None:
    """The launcher's path, built now if this source has no binary yet; None where it
    cannot be had here (switched off, no compiler, a failed build: logged once)."""
    if os.environ.get("SANDMILL_LAUNCHER", "1") == "0":
        return None
    return compile_cached("launcher", {"launcher.c": SOURCE}, FLAGS, "the native exec zygote")


def compile_cached(name: str, sources: dict[str, bytes], flags: tuple[str, ...], what: str,
                   salt: bytes = b"") -> str | None:
    """``sources``' first file compiled with ``flags`` into the cache dir, once per source
    (and ``salt``); its path, or None where it cannot be built here (logged)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    digest = hashlib.sha256(b"".join(sources.values()) + " ".join(flags).encode() + salt).hexdigest()[:16]
    target = cache_dir() / f"{name}-{digest}"
    if os.access(target, os.R_OK):
        return str(target)
    if cc is None:
        log.info("no C compiler (cc): no %s", what)
        return None
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        with tempfile.TemporaryDirectory(prefix=f"sandmill-{name}-") as tmp:
            for fname, data in sources.items():
                (Path(tmp) / fname).write_bytes(data)
            out = target.parent / f".{target.name}.{os.getpid()}"
            r = subprocess.run([cc, *flags, "-o", str(out), next(iter(sources))], capture_output=True,
                               timeout=BUILD_TIMEOUT_S, cwd=tmp)
            if r.returncode != 0:
                out.unlink(missing_ok=True)
                log.warning("cannot build %s (%s): %s", what, cc, r.stderr.decode(errors="replace")[-2000:])
                return None
            out.chmod(0o755)
            os.replace(out, target)  # atomic: another worker building at once is harmless
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("cannot build %s: %s", what, e)
        return None
    return str(target)


def _field(s: str) -> bytes:
    b = s.encode(errors="surrogateescape")
    if b"\0" in b:
        raise WarmError("a NUL byte in the job's argv, env or paths")
    return b + b"\0"


def encode(req: JobRequest) -> bytes:
    """The K message of ``req`` for the native launcher (format: launcher.c). Raises
    WarmError for what it cannot carry (mounts of its own, a NUL byte)."""
    if req.mounts or req.exec is None:
        raise WarmError("the native launcher runs exec jobs without mounts only")
    out = [b"K", _field(req.dir), _field(req.mount),
           _field(str(req.tmp_bytes) if req.tmp_bytes else ""), _field(req.hostname or ""),
           _field(str(len(req.rlimits)))]
    for res, soft, hard in req.rlimits:
        out += [_field(str(res)), _field(str(soft & MASK64)), _field(str(hard & MASK64))]
    out.append(_field(str(len(req.exec))))
    out += [_field(a) for a in req.exec]
    out.append(_field(str(len(req.env))))
    out += [_field(f"{k}={v}") for k, v in req.env.items()]
    return b"".join(out)
