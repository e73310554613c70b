"""Warm interpreters (isolation/warm.py): what a fork from a warm interpreter must add
to the conformance suite, which runs every case warm too (``<backend>+warm``)."""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest
from test_conformance import PY, explain, spec

from sandmill.isolation import Backend, RunSpec, Status
from sandmill.isolation.nsjail import NsjailBackend
from sandmill.isolation.process import ProcessBackend
from sandmill.isolation.warm import WarmError, WarmPool

pytestmark = pytest.mark.timeout(60)


def _usable(cls: type[Backend]) -> Backend:
    b = cls()
    probe = b.probe()
    if not probe.available or b.warm_pool is None:  # type: ignore[attr-defined]
        why = f"{cls.name}: no warm interpreters here ({probe.reason or 'not root or no cgroups'})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI runs the warm suite, but {why}")
        pytest.skip(why)
    return b


@pytest.fixture(params=["process", "nsjail"])
def warm(request):
    b = _usable(ProcessBackend if request.param == "process" else NsjailBackend)
    yield b
    b.close()


def _zygote_pids(b) -> list[int]:
    return [z.pid for zs in b.warm_pool.idle.values() for z in zs]


async def test_jobs_share_one_warm_interpreter(warm) -> None:
    outs = [await warm.run(spec("print('ok')")) for _ in range(3)]
    assert all(o.status is Status.success and o.warm for o in outs), [explain(o) for o in outs]
    assert len(_zygote_pids(warm)) == 1  # one job at a time: one interpreter, reused


async def test_nothing_of_a_job_reaches_the_next(warm) -> None:
    first = ("import sys, json, calendar\n"
             "json.LEAKED = 'secret'; calendar.LEAKED = 'secret'\n"
             "open('/tmp/left', 'w').write('x')\n"
             "print('calendar' in sys.modules)\n")
    o1 = await warm.run(spec(first))
    assert o1.status is Status.success and o1.warm, explain(o1)
    second = ("import sys, os, json\n"
              "print(hasattr(json, 'LEAKED'), 'calendar' in sys.modules, os.listdir('/tmp'))\n")
    o2 = await warm.run(spec(second))
    assert o2.warm and o2.stdout.split(b"\n")[0] == b"False False []", explain(o2)


async def test_no_capabilities_no_other_processes(warm) -> None:
    code = ("import os\n"
            "st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
            "print(st['CapEff'].strip(), st['CapPrm'].strip(), st['NoNewPrivs'].strip())\n"
            "print(os.getpid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n")
    o = await warm.run(spec(code))
    assert o.warm, explain(o)
    caps, procs = o.stdout.decode().splitlines()
    assert caps == "0000000000000000 0000000000000000 1"
    assert procs == "1 [1]"  # pid 1 of its own pid namespace: the zygote is out of sight


async def test_job_env_argv_and_exit_code(warm) -> None:
    code = "import os, sys\nprint(sorted(os.environ), sys.argv)\nsys.exit(7)\n"
    s = spec(code, env={"ONLY": "this"})
    s.argv += ["a1", "a2"]
    o = await warm.run(s)
    assert o.warm and o.status is Status.exit_nonzero and o.exit_code == 7, explain(o)
    assert o.stdout.strip() == b"['LANG', 'ONLY', 'PATH'] ['run.py', 'a1', 'a2']"


async def test_uncaught_exception_is_exit_1_with_traceback(warm) -> None:
    o = await warm.run(spec("raise ValueError('boom')"))
    assert o.warm and o.exit_code == 1, explain(o)
    assert b"ValueError: boom" in o.stderr and b"Traceback" in o.stderr


async def test_a_killed_interpreter_is_replaced(warm) -> None:
    assert (await warm.run(spec("print(1)"))).warm
    [pid] = _zygote_pids(warm)
    os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.1)
    outs = [await warm.run(spec("print(2)")) for _ in range(2)]
    assert all(o.status is Status.success for o in outs), [explain(o) for o in outs]
    assert outs[-1].warm and _zygote_pids(warm) != [pid]


async def test_closing_stops_every_interpreter(warm) -> None:
    assert (await warm.run(spec("print(1)"))).warm
    [pid] = _zygote_pids(warm)
    warm.close()
    await asyncio.sleep(0.2)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_cold_when_warm_cannot_start(monkeypatch) -> None:
    async def fail(self, key, script):
        raise WarmError("no warm interpreter in this test")

    monkeypatch.setattr(WarmPool, "_start", fail)
    b = _usable(ProcessBackend)
    try:
        o = await b.run(spec("print('cold')"))
        assert o.status is Status.success and not o.warm and o.stdout == b"cold\n", explain(o)
        assert b.warm_pool.disabled  # type: ignore[union-attr]
    finally:
        b.close()


async def test_other_programs_are_exec_ed_warm(warm) -> None:
    # No runtime script, or interpreter flags: a warm job process execs the program
    # (a fresh interpreter, flags and all), still without the sandbox set-up.
    plain = RunSpec(argv=[PY, "-X", "dev", "-c", "import sys, os; print(sys.flags.dev_mode, os.getpid())"],
                    env={"PATH": "/usr/bin:/bin"})
    o = await warm.run(plain)
    assert o.status is Status.success and o.warm, explain(o)
    assert o.stdout == b"True 1\n"
    # Python ignores SIGPIPE; a program it execs must not inherit that.
    o = await warm.run(RunSpec(argv=["/bin/bash", "-c", "yes | head -n 2; echo done"],
                               env={"PATH": "/usr/bin:/bin"}))
    assert o.status is Status.success and o.warm and o.stdout == b"y\ny\ndone\n", explain(o)


async def test_network_host_and_unknown_programs_run_cold(warm) -> None:
    if warm.name == "nsjail":
        o = await warm.run(RunSpec(argv=[PY, "-c", "print(1)"], env={"PATH": "/usr/bin:/bin"},
                                   network="host"))
        assert o.status is Status.success and not o.warm, explain(o)
    o = await warm.run(RunSpec(argv=["/no/such/program"], env={"PATH": "/usr/bin:/bin"}))
    assert o.status is Status.sandbox_error and not o.warm, explain(o)
