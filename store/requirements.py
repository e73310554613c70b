"""A python3 script's requirements: its ``# requirements:`` block, else its imports.

Pure functions, no I/O. It lives in the store layer because it defines a script version's
``requirements`` column, which the API computes at ``scripts/create`` and the worker
computes for previews: both sides need the same answer.

Order of sources (as Windmill accepts them):

1. an explicit block, pip syntax, one requirement per comment line::

       # requirements:
       # six==1.17.0
       # idna>=3

   ending at the first line that is not a comment, or an empty comment;
2. otherwise the script's imports (anywhere in the module), the standard library left
   out (``sys.stdlib_module_names``), each mapped to its distribution (``IMPORT_TO_DIST``
   for the usual mismatches, else the module's own name).

A requirement is a name with optional extras, version specifiers and markers. Options
(``--index-url``, ``-r file``), paths and direct URL references (``pkg @ url``) are
refused: the installer runs on the worker host with the index the operator chose, and a
script must not be able to point it at a file or another index.
"""

from __future__ import annotations

import ast
import re
import sys

# import name -> distribution, for the names that differ (PyPI names compare
# case-insensitively and with - _ . the same, so only real mismatches are listed)
IMPORT_TO_DIST: dict[str, str] = {
    "yaml": "PyYAML", "bs4": "beautifulsoup4", "PIL": "Pillow", "sklearn": "scikit-learn",
    "skimage": "scikit-image", "cv2": "opencv-python", "dateutil": "python-dateutil",
    "dotenv": "python-dotenv", "jwt": "PyJWT", "Crypto": "pycryptodome", "attr": "attrs",
    "psycopg2": "psycopg2-binary", "MySQLdb": "mysqlclient", "serial": "pyserial",
    "magic": "python-magic", "docx": "python-docx", "pptx": "python-pptx", "git": "GitPython",
    "OpenSSL": "pyOpenSSL", "jose": "python-jose", "slugify": "python-slugify",
    "multipart": "python-multipart", "telegram": "python-telegram-bot", "dns": "dnspython",
    "ldap": "python-ldap", "zmq": "pyzmq", "usb": "pyusb", "Bio": "biopython", "fitz": "PyMuPDF",
    "google": "google-api-core", "faiss": "faiss-cpu", "kafka": "kafka-python",
    "websocket": "websocket-client", "socks": "PySocks", "markdown": "Markdown",
    "lxml": "lxml", "nacl": "PyNaCl", "Levenshtein": "python-Levenshtein",
}

# modules no distribution provides: the wrapper's own name and the future switch
_NOT_DISTRIBUTIONS = frozenset({"__future__", "__sandmill_main__"})

_BLOCK_START = re.compile(r"^#\s*requirements\s*:\s*$", re.I)
# one marker test: python_version >= '3.8', sys_platform == "linux" (parentheses allowed)
_OPERAND = r"(?:[A-Za-z_][A-Za-z0-9_.]*|'[^'\"\\]*'|\"[^'\"\\]*\")"
_MARKER = rf"\(*\s*{_OPERAND}\s*(?:===|==|!=|~=|<=|>=|<|>|not\s+in|in)\s*{_OPERAND}\s*\)*"
# name[extras] (specifiers) (; markers): no option, path, URL or direct reference
_REQUIREMENT = re.compile(
    r"^[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"   # name
    r"(?:\s*\[[A-Za-z0-9._,\s-]*\])?"                 # extras
    r"(?:\s*(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+"
    r"(?:\s*,\s*(?:===|==|!=|~=|<=|>=|<|>)\s*[A-Za-z0-9.*+!_-]+)*)?"  # specifiers
    rf"(?:\s*;\s*{_MARKER}(?:\s+(?:and|or)\s+{_MARKER})*)?$"  # markers
)
MAX_REQUIREMENTS = 200


class RequirementsError(ValueError):
    """A ``# requirements:`` block that cannot be used; the message names the line."""


def requirements_block(content: str) -> list[str] | None:
    """The requirements of the script's ``# requirements:`` block, or None if it has none.
    Raises RequirementsError for a line that is not a plain requirement."""
    lines = content.splitlines()
    for i, line in enumerate(lines):
        if not _BLOCK_START.match(line.strip()):
            continue
        out: list[str] = []
        for j in range(i + 1, len(lines)):
            text = lines[j].strip()
            if not text.startswith("#"):
                break
            req = text[1:].strip()
            if not req:
                break
            req = req.split(" #", 1)[0].strip()  # a trailing comment
            if not _REQUIREMENT.match(req):
                raise RequirementsError(
                    f"line {j + 1} of the # requirements: block: {req[:80]!r} is not a"
                    f" requirement (name[extras] and version specifiers only; no options,"
                    f" paths or URLs)")
            out.append(req)
        if len(out) > MAX_REQUIREMENTS:
            raise RequirementsError(f"the # requirements: block lists {len(out)} requirements,"
                                    f" more than {MAX_REQUIREMENTS}")
        return out
    return None


def imported_modules(content: str) -> list[str]:
    """The top-level names of the modules the script imports (absolute imports only),
    sorted; none when the script does not parse (it then fails with its own error)."""
    try:
        tree = ast.parse(content)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return sorted(names)


def distribution_of(module: str) -> str | None:
    """The distribution that provides ``module``, or None for the standard library."""
    if module in sys.stdlib_module_names or module in _NOT_DISTRIBUTIONS or module in sys.builtin_module_names:
        return None
    return IMPORT_TO_DIST.get(module, module)


def requirements_of(content: str) -> list[str]:
    """A python3 script's requirements: its block if it has one, else its imports mapped
    to distributions (standard library left out). Empty: the script needs nothing."""
    block = requirements_block(content)
    if block is not None:
        return block
    dists = {d for m in imported_modules(content) if (d := distribution_of(m))}
    return sorted(dists, key=str.lower)


def requirements_text(reqs: list[str]) -> str | None:
    """The stored form: one requirement a line (None for none), what the resolver reads."""
    return "\n".join(reqs) + "\n" if reqs else None
