"""What PostgreSQL can hold, and making a job's bytes fit it. Pure functions.

Every byte a job prints or returns is hostile. PostgreSQL's ``text`` cannot hold U+0000,
its ``jsonb`` refuses ``\\u0000``, lone surrogates, NaN and Infinity, and asyncpg cannot
encode a lone surrogate at all: any of them in a statement makes the whole statement fail.
Text (logs, error messages, the outcome's strings) is made storable with a visible
replacement; a python3 result that cannot be stored fails the job (ResultNotStorable)
rather than be silently changed. See docs/architecture.md ("Untrusted bytes")."""

from __future__ import annotations

import json
import math
import re
from typing import Any

NUL_SHOWN = "\u2400"  # "␀", SYMBOL FOR NULL: shows where the job wrote a NUL
BAD_SHOWN = "\ufffd"  # the replacement character, as undecodable bytes get
MAX_RESULT_JSON_BYTES = 16 * 1024 * 1024  # a result larger than this as JSON is refused

# NUL and every surrogate code point: in a Python str a surrogate is always unpaired
# (json.loads and UTF-8 decoding join pairs into one code point)
_BAD_TEXT = re.compile("[\x00\ud800-\udfff]")
# what json.dumps (ensure_ascii) writes for the above, and the constants jsonb refuses; a
# match may be a false alarm (inside a string, after an escaped backslash): walked then
_SUSPECT_JSON = re.compile(r"\\u0000|\\ud[89a-f]|NaN|Infinity", re.I)
_KEY_PLAIN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _shown(ch: str) -> str:
    return NUL_SHOWN if ch == "\x00" else BAD_SHOWN


def storable_text(s: str) -> str:
    """``s`` as PostgreSQL text can hold it: NUL shown as U+2400, a lone surrogate as U+FFFD."""
    if _BAD_TEXT.search(s) is None:  # the usual case: no copy
        return s
    return _BAD_TEXT.sub(lambda m: _shown(m.group()), s)


def decode_output(data: bytes) -> str:
    """A job's output bytes as storable text: invalid UTF-8 as U+FFFD, NUL as U+2400."""
    return storable_text(data.decode("utf-8", errors="replace"))


def storable_json(value: Any) -> Any:
    """A copy of ``value`` with every string and key made storable (storable_text) and
    NaN/Infinity as null: for what sandmill itself stores (the outcome), not job results."""
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {storable_text(str(k)): storable_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable_json(v) for v in value]
    return value


def json_problem(value: Any, what: str = "the result") -> str | None:
    """Why ``value`` cannot be stored as jsonb, in words with the place (``$.a[2]``), or
    None when it can. Checks the size (MAX_RESULT_JSON_BYTES) too."""
    try:
        text = json.dumps(value)  # ensure_ascii: NUL and surrogates become escapes
    except (TypeError, ValueError, RecursionError) as e:
        return f"{what} is not JSON: {e}"
    if len(text) > MAX_RESULT_JSON_BYTES:
        return (f"{what} is {len(text)} bytes as JSON, over the {MAX_RESULT_JSON_BYTES} bytes"
                f" a result may take")
    if _SUSPECT_JSON.search(text) is None:  # the usual case: no walk
        return None
    found = find_unstorable(value)
    if found is None:
        return None
    problem, path = found
    return f"{what} holds {problem} at {path}; PostgreSQL's JSON cannot store it"


def describe_text(s: str) -> str | None:
    """What in ``s`` PostgreSQL's text cannot hold (the first), in words, or None."""
    m = _BAD_TEXT.search(s)
    if m is None:
        return None
    if m.group() == "\x00":
        return "a NUL character"
    return f"a lone surrogate (U+{ord(m.group()):04X})"


def _key_path(path: str, key: str) -> str:
    if _KEY_PLAIN.match(key):
        return f"{path}.{key}"
    shown = json.dumps(key if len(key) <= 40 else key[:40] + "...")  # escapes NUL, surrogates
    return f"{path}[{shown}]"


def find_unstorable(value: Any, root: str = "$") -> tuple[str, str] | None:
    """(the problem, its path from ``root``) of the first thing jsonb refuses, depth first;
    iterative, so that any depth json.loads produced is walked."""
    stack: list[tuple[Any, str]] = [(value, root)]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            problem = describe_text(v)
            if problem:
                return problem, path
        elif isinstance(v, float):
            if not math.isfinite(v):
                return ("NaN" if math.isnan(v) else "Infinity"), path
        elif isinstance(v, dict):
            items = []
            for k, item in v.items():
                k = str(k)
                p = _key_path(path, k)
                problem = describe_text(k)
                if problem:
                    return f"{problem} in a key", p
                items.append((item, p))
            stack.extend(reversed(items))
        elif isinstance(v, (list, tuple)):
            stack.extend(reversed([(item, f"{path}[{i}]") for i, item in enumerate(v)]))
    return None
