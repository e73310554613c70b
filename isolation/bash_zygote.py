"""Warm bash (``bash_zygote.c``): bash jobs run in a clone of a started bash, not by exec.

The native exec zygote (launcher.c) built as a bash loadable builtin, against the headers
of Debian's ``bash-builtins`` (``/usr/include/bash``). A zygote is that bash running a
two-line script from its own dir; a bash job (``BASH main.sh ARGS``) then skips the exec,
the dynamic loading and bash's start (docs/performance.md, "Round 9: warm bash"). Where
it cannot be built (no headers, no compiler, another bash than the headers', or
``SANDMILL_WARM_BASH=0``), bash jobs are exec'd by the native exec zygote as before.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from .launcher import SOURCE as LAUNCHER_SOURCE, compile_cached

__all__ = ["LIBRARY", "SCRIPT", "build", "install"]

log = logging.getLogger(__name__)

SOURCE = resources.files("sandmill.isolation").joinpath("bash_zygote.c").read_bytes()
HEADERS = Path(os.environ.get("SANDMILL_BASH_HEADERS", "/usr/include/bash"))
LIBRARY = ".sandmill-bash.so"  # the builtin, and the zygote's script, in its dir
SCRIPT = ".sandmill-bash.sh"
FLAGS = ("-O2", "-Wall", "-fPIC", "-shared", f"-I{HEADERS}", f"-I{HEADERS}/include",
         f"-I{HEADERS}/builtins", "-I.")


def _version(bash: str) -> str | None:
    """``bash``'s BASH_VERSION (e.g. 5.2.15(1)-release), None when it does not run."""
    try:
        r = subprocess.run([bash, "-c", "echo $BASH_VERSION"], capture_output=True, timeout=10,
                           env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.decode(errors="replace").strip() if r.returncode == 0 else None


def _headers_version() -> str | None:
    """The bash version of the installed headers (version.h's SCCSVERSION: 5.2.15(1))."""
    try:
        m = re.search(r"Bash version (\S+)", (HEADERS / "version.h").read_text())
    except OSError:
        return None
    return m.group(1) if m else None


@functools.cache
def build(bash: str) -> str | None:
    """The builtin's path for ``bash``, built now if needed; None where warm bash cannot
    be had here (logged once)."""
    if os.environ.get("SANDMILL_WARM_BASH", "1") == "0":
        return None
    version, headers = _version(bash), _headers_version()
    if version is None or headers is None:
        log.info("no warm bash: %s", "no bash headers (Debian: bash-builtins)" if headers is None
                 else f"{bash} does not run")
        return None
    if not version.startswith(headers):  # a builtin must match its bash's structures
        log.warning("no warm bash: %s is %s, the headers in %s are %s", bash, version, HEADERS, headers)
        return None
    return compile_cached("bash-zygote", {"bash_zygote.c": SOURCE, "launcher.c": LAUNCHER_SOURCE},
                          FLAGS, "warm bash", salt=version.encode())


def install(library: str, zdir: Path, seen_at: str) -> list[str]:
    """Put the builtin and the zygote's script in ``zdir`` (its dir, at ``seen_at`` in
    the sandbox), read-only to the job uid; the argv tail after bash."""
    shutil.copyfile(library, zdir / LIBRARY)
    (zdir / SCRIPT).write_text(
        f'enable -f {shlex.quote(f"{seen_at}/{LIBRARY}")} sandmill_zygote || exit 121\n'
        'sandmill_zygote "$@"\n')
    for name in (LIBRARY, SCRIPT):
        os.chmod(zdir / name, 0o644)
    return [f"{seen_at}/{SCRIPT}"]
