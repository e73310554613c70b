"""The in-sandbox programs share code through `# sandmill: include F` lines, expanded when
the worker loads them: what runs is one whole file, with no include line left."""

from __future__ import annotations

import re

from sandmill.worker.dedicated_runtime import RUNTIME_SOURCE
from sandmill.worker.runtimes import _PY_WRAPPER, template

SHARED = template("fastjson.py")


def test_programs_carry_the_shared_code_once_and_no_include_line():
    for prog in (_PY_WRAPPER, RUNTIME_SOURCE):
        assert prog.count(b"_json.make_scanner(_Ctx)") == 1
        assert not re.search(rb"^# sandmill: include ", prog, re.M)
        compile(prog, "program", "exec")


def test_the_shared_json_refuses_nan_and_extra_data():
    ns: dict = {}
    exec(compile(SHARED, "fastjson.py", "exec"), ns)
    assert ns["_loads"]('{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    assert ns["_dumps"]({"a": [1, "é"]}) == '{"a": [1, "é"]}'
    for bad in ("NaN", "[1] 2"):
        try:
            ns["_loads"](bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} was accepted")
