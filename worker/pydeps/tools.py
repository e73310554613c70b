"""The resolver and the installer: ``uv`` (PyPI's ``uv`` package ships its binary), ``pip``
as the fallback. Blocking: callers run these in a thread.

Both run on the worker host, outside any job sandbox, with the worker's environment: the
package index and a CA bundle for private indexes and proxies come from it
(``UV_INDEX_URL``/``UV_DEFAULT_INDEX``, or ``PIP_INDEX_URL`` and ``PIP_EXTRA_INDEX_URL``
translated for uv; ``SSL_CERT_FILE``, or ``PIP_CERT`` translated). Wheels only: building an
sdist would run a package's own code here, as the worker's user, outside the sandbox.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

TIMEOUT_S = float(os.environ.get("SANDMILL_PYDEPS_TIMEOUT_S", 600))
MAX_LOG = 64 * 1024  # characters of the tool's output kept for the job's logs


class ToolError(Exception):
    """The resolver or installer failed; the message is its own (the tail of its output)."""


@dataclass(frozen=True)
class Target:
    """The interpreter the jobs run: what a lock is resolved and installed for."""

    version: str   # "3.11"
    machine: str   # "x86_64"

    @property
    def tag(self) -> str:
        """A short name, part of every cache key: cp311-x86_64."""
        return f"cp{self.version.replace('.', '')}-{self.machine}"

    @property
    def uv_platform(self) -> str:
        return f"{self.machine}-unknown-linux-gnu"


@functools.lru_cache(maxsize=16)
def target_of(python: str) -> Target:
    """The version of the jobs' interpreter ``python`` (run once; a path that does not run
    here, as for an image's own interpreter, falls back to SANDMILL_PYDEPS_PYTHON_VERSION,
    else the worker's own version)."""
    version = os.environ.get("SANDMILL_PYDEPS_PYTHON_VERSION")
    if not version:
        try:
            out = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30, check=True)
            version = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            version = "%d.%d" % sys.version_info[:2]
    return Target(version, platform.machine())


def uv_binary() -> str | None:
    """The uv binary: the one the ``uv`` package ships, else one on PATH; None: use pip."""
    if os.environ.get("SANDMILL_PYDEPS_TOOL", "uv") == "pip":
        return None
    try:
        import uv  # noqa: PLC0415 - optional: pip is the fallback

        return uv.find_uv_bin()
    except (ImportError, FileNotFoundError):
        return shutil.which("uv")


def installer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The resolver's and installer's environment: the worker's, with pip's index and CA
    settings given to uv too (uv reads its own names only)."""
    env = dict(os.environ if base is None else base)
    if "PIP_INDEX_URL" in env:
        env.setdefault("UV_INDEX_URL", env["PIP_INDEX_URL"])
    if "PIP_EXTRA_INDEX_URL" in env:
        env.setdefault("UV_EXTRA_INDEX_URL", env["PIP_EXTRA_INDEX_URL"])
    if "PIP_CERT" in env:
        env.setdefault("SSL_CERT_FILE", env["PIP_CERT"])
    env.setdefault("UV_NO_PROGRESS", "1")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv: list[str], cwd: str, stdin: str | None = None, cache: str | None = None) -> tuple[int, str, str]:
    env = installer_env()
    if cache:
        env.setdefault("UV_CACHE_DIR", cache)
    try:
        p = subprocess.run(argv, input=stdin, capture_output=True, text=True, cwd=cwd, env=env,
                           timeout=TIMEOUT_S, errors="replace")
    except subprocess.TimeoutExpired:
        raise ToolError(f"{os.path.basename(argv[0])} did not finish within {TIMEOUT_S:g} s"
                        f" (SANDMILL_PYDEPS_TIMEOUT_S)") from None
    except OSError as e:
        raise ToolError(f"cannot run {argv[0]}: {e}") from None
    return p.returncode, p.stdout, p.stderr[-MAX_LOG:]


def _failure(tool: str, what: str, err: str) -> ToolError:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    msg = " | ".join(ln.strip() for ln in lines[-6:]) or "no output"
    return ToolError(f"{tool} {what} failed: {msg}")


def resolve(requirements: str, target: Target, cache: str | None = None) -> tuple[str, str]:
    """Resolve ``requirements`` (one a line) into a lock: exact versions with hashes, for
    ``target``. Returns (lock, the tool's log); raises ToolError with its message."""
    with tempfile.TemporaryDirectory(prefix="sandmill-resolve-") as d:
        uv = uv_binary()
        if uv:
            code, out, err = _run(
                [uv, "pip", "compile", "--no-config", "--generate-hashes", "--no-header",
                 "--no-annotate", "--only-binary", ":all:", "--python-version", target.version,
                 "--python-platform", target.uv_platform, "-", "-o", "-"],
                d, stdin=requirements, cache=cache)
            if code:
                raise _failure("uv pip compile", "(resolving the requirements)", err)
            return out, err
        return _pip_resolve(requirements, target, d)


def _pip_resolve(requirements: str, target: Target, d: str) -> tuple[str, str]:
    """pip's resolution, as a lock: ``pip install --dry-run --report`` for the wheels the
    jobs' Python would get, each pinned with the hash of that wheel."""
    req = os.path.join(d, "requirements.in")
    with open(req, "w") as f:
        f.write(requirements)
    code, out, err = _run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed",
         "--target", os.path.join(d, "dry-run"), "--only-binary", ":all:", "--python-version",
         target.version, "--report", "-", "-r", req],
        d)
    if code:
        raise _failure("pip", "(resolving the requirements)", err)
    lines = []
    for item in sorted(json.loads(out)["install"], key=lambda i: i["metadata"]["name"].lower()):
        meta, info = item["metadata"], item.get("download_info", {})
        hashes = info.get("archive_info", {}).get("hashes", {})
        if "sha256" not in hashes:
            raise ToolError(f"pip gave no sha256 for {meta['name']} {meta['version']}")
        lines.append(f"{meta['name']}=={meta['version']} \\\n    --hash=sha256:{hashes['sha256']}")
    return "\n".join(lines) + "\n", err


def install(lock: str, target: Target, dest: str, cache: str | None = None) -> str:
    """Install exactly ``lock`` (hashes required, no other dependency) into the new
    directory ``dest``, for ``target``. Returns the tool's log; raises ToolError."""
    with tempfile.TemporaryDirectory(prefix="sandmill-install-") as d:
        req = os.path.join(d, "lock.txt")
        with open(req, "w") as f:
            f.write(lock)
        uv = uv_binary()
        if uv:
            argv = [uv, "pip", "install", "--no-config", "--target", dest, "--require-hashes",
                    "--no-deps", "--no-build", "--link-mode", "copy", "--python-version",
                    target.version, "--python-platform", target.uv_platform, "-r", req]
            tool = "uv pip install"
        else:
            argv = [sys.executable, "-m", "pip", "install", "--quiet", "--target", dest,
                    "--require-hashes", "--no-deps", "--only-binary", ":all:", "--no-compile",
                    "--python-version", target.version, "-r", req]
            tool = "pip install"
        code, out, err = _run(argv, d, cache=cache)
        if code:
            raise _failure(tool, "(installing the lock)", err)
        return (out + err)[-MAX_LOG:]
