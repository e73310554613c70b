"""Warm bash (isolation/bash_zygote.c, bash_zygote.py): a bash job run in a clone of a
started bash sees what the same job exec'd sees; what a bash reads at its start makes a
fresh bash; where the builtin cannot be built, bash jobs are exec'd as before. (The
conformance suite's ``+bash`` variants run every guarantee through it.)"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest

from sandmill.isolation import Limits, RunSpec, bash_zygote, workdir
from sandmill.isolation.nsjail import NsjailBackend
from sandmill.isolation.process import ProcessBackend
from sandmill.isolation.spec import Status
from sandmill.isolation.warm import BASH, NATIVE

pytestmark = pytest.mark.timeout(120)
BASH_BIN = "/bin/bash"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "FOO": "bar baz"}
# Everything a script can see of how its bash started, in one output.
PROBE = rb"""echo "first_=$_"
echo "0=$0 args=[$1][$2] #=$# -=$- src=${BASH_SOURCE[*]} lineno=$LINENO pid=$$ ppid=$PPID"
echo "shlvl=$SHLVL pwd=$PWD oldpwd=${OLDPWD-unset} host=$HOSTNAME seconds=$SECONDS"
not_a_command_here
f() { echo "in f: ${FUNCNAME[*]} ${BASH_LINENO[*]} $(caller 0)"; }; f
env | sort
echo fds: /proc/$$/fd/*
type sandmill_zygote 2>&1; enable -a | md5sum
declare -p | grep -v -E '^declare -[-a-zA-Z]* (BASHPID|RANDOM|SRANDOM|EPOCHREALTIME|EPOCHSECONDS|SECONDS|BASH_COMMAND)='
declare -f; shopt -p; set -o; trap -p; ulimit -a; umask; jobs -l
while IFS= read -r l; do case $l in Sig*|Shd*|NoNew*|Cap*|Uid*|Gid*|Groups*) echo "$l";; esac; done </proc/$$/status
tr '\0' ' ' < /proc/$$/cmdline | sed 's/ *$//'; echo
return 3
exit 7
"""


def _backend(kind: str):
    root = str(workdir.owner_root(workdir.default_root()))
    return NsjailBackend(workdir_root=root) if kind == "nsjail" else ProcessBackend(workdir_root=root)


def _spec(script: bytes = PROBE, env: dict[str, str] | None = None) -> RunSpec:
    return RunSpec(argv=[BASH_BIN, "main.sh", "a1", "a 2"], env=dict(env or ENV),
                   files={"main.sh": script}, limits=Limits())


def _in_warm_bash(out: bytes) -> bool:
    return b"in a warm bash" in out


WHERE = b'grep -q sandmill-bash /proc/$$/maps && echo "in a warm bash"\n'


def _normal(text: str) -> str:
    return re.sub(r"warm-[0-9a-f]{12}", "warm-X", text)  # the process backend's zygote dir


async def _runs(b, spec: RunSpec, n: int = 2):
    return [await b.run(spec) for _ in range(n)]


@pytest.fixture(params=["process", "nsjail"])
def kind(request: pytest.FixtureRequest) -> str:
    b = _backend(request.param)
    try:
        if b.warm_pool is None or bash_zygote.build(BASH_BIN) is None:
            why = f"no warm bash on {request.param} here"
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(f"CI installs what warm bash needs (.ci/setup.sh), but: {why}")
            pytest.skip(why)
    finally:
        b.close()
    return request.param


def test_a_warm_bash_job_sees_what_an_execd_one_sees(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    warm = _backend(kind)
    execd = _backend(kind)
    execd.warm_pool.bash[BASH_BIN] = ""  # as where warm bash cannot be built: exec'd by launcher.c
    try:
        probe = PROBE.replace(b"return 3\n", WHERE + b"return 3\n")
        ours = asyncio.run(_runs(warm, _spec(probe)))
        theirs = asyncio.run(_runs(execd, _spec(probe)))
        assert (BASH + BASH_BIN, b"") in warm.warm_pool.idle
        assert (NATIVE, b"") in execd.warm_pool.idle
    finally:
        warm.close()
        execd.close()
    for o in ours + theirs:
        assert o.status is Status.exit_nonzero and o.exit_code == 7 and o.warm, o
    assert all(_in_warm_bash(o.stdout) for o in ours)
    assert not any(_in_warm_bash(o.stdout) for o in theirs)
    for a, b in zip(ours, theirs):
        out_a, out_b = a.stdout.decode().replace("in a warm bash\n", ""), b.stdout.decode()
        assert _normal(out_a).splitlines() == _normal(out_b).splitlines()
        assert a.stderr == b.stderr
    assert b"main.sh: line 4: not_a_command_here: command not found" in ours[0].stderr
    assert b"0=main.sh args=[a1][a 2] #=2 -=hB src=main.sh lineno=2 pid=1 ppid=0" in ours[0].stdout


def test_each_job_gets_its_own_random_seed_and_clock(kind: str) -> None:
    b = _backend(kind)
    spec = _spec(WHERE + b"echo $RANDOM $RANDOM; echo $SECONDS\n")

    async def runs():
        first = await b.run(spec)
        await asyncio.sleep(2.5)  # the zygote is 2.5 s older than the jobs after
        return [first, *await _runs(b, spec, 3)]

    try:
        outs = asyncio.run(runs())
    finally:
        b.close()
    assert all(_in_warm_bash(o.stdout) for o in outs), outs
    randoms = [o.stdout.splitlines()[-2] for o in outs]
    assert len(set(randoms)) == 4, randoms
    assert all(int(o.stdout.splitlines()[-1]) <= 1 for o in outs)  # SECONDS: from the job's start


@pytest.mark.parametrize("name,value,expect", [
    ("SHELLOPTS", "xtrace", b"+ echo ran"),
    ("BASH_ENV", "env.sh", b"from BASH_ENV"),
    ("BASH_FUNC_greet%%", "() {  echo from an exported function; }", b"from an exported function"),
])
def test_what_bash_reads_at_its_start_makes_a_fresh_bash(kind: str, name: str, value: str,
                                                          expect: bytes) -> None:
    b = _backend(kind)
    script = WHERE + b"echo ran; if type greet >/dev/null 2>&1; then greet; fi\n"
    spec = _spec(script, {**ENV, name: value})
    spec.files["env.sh"] = b"echo from BASH_ENV\n"
    try:
        o = asyncio.run(b.run(spec))
    finally:
        b.close()
    assert o.status is Status.success and o.warm, o
    assert not _in_warm_bash(o.stdout)
    assert expect in o.stdout + o.stderr


def test_a_job_without_path_is_left_to_a_fresh_bash(kind: str) -> None:
    b = _backend(kind)
    env = {k: v for k, v in ENV.items() if k != "PATH"}  # a bash without one makes its own
    try:
        o = asyncio.run(b.run(_spec(b"/bin/grep -q sandmill-bash /proc/$$/maps && echo 'in a warm bash'\n"
                                    b"echo \"PATH=${PATH-unset}\"\n", env)))
    finally:
        b.close()
    assert o.status is Status.success and not _in_warm_bash(o.stdout), o
    assert b"PATH=/usr/local/bin:/usr/bin:/bin" not in o.stdout  # not the zygote's


def test_a_binary_script_and_bash_options_are_left_to_a_fresh_bash(kind: str) -> None:
    b = _backend(kind)
    spec = _spec(WHERE + b"echo $-\n")
    spec.argv = [BASH_BIN, "-x", "main.sh"]

    async def both():
        return await b.run(_spec(b"\x7fELF\x00\x00\x00junk\n")), await b.run(spec)

    try:
        binary, traced = asyncio.run(both())
    finally:
        b.close()
    assert binary.exit_code == 126 and b"cannot execute binary file" in binary.stderr, binary
    assert traced.status is Status.success and not _in_warm_bash(traced.stdout)
    assert b"hxB" in traced.stdout and b"+ echo" in traced.stderr


def test_without_the_headers_bash_jobs_are_execd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bash_zygote.build.cache_clear()
    try:
        monkeypatch.setattr(bash_zygote, "HEADERS", tmp_path)  # no headers
        assert bash_zygote.build(BASH_BIN) is None
        bash_zygote.build.cache_clear()
        (tmp_path / "version.h").write_text('#define SCCSVERSION "@(#)Bash version 4.4.20(1) release GNU"\n')
        assert bash_zygote.build(BASH_BIN) is None  # headers of another bash: never loaded
        bash_zygote.build.cache_clear()
        monkeypatch.setenv("SANDMILL_WARM_BASH", "0")
        monkeypatch.setattr(bash_zygote, "HEADERS", Path("/usr/include/bash"))
        assert bash_zygote.build(BASH_BIN) is None
        b = _backend("process")
        try:
            o = asyncio.run(b.run(_spec(WHERE + b"echo ok\n")))
        finally:
            b.close()
        assert o.status is Status.success and b"ok" in o.stdout and not _in_warm_bash(o.stdout)
    finally:
        bash_zygote.build.cache_clear()


def test_a_warm_bash_that_cannot_start_turns_only_itself_off(kind: str) -> None:
    b = _backend(kind)
    spec = _spec(WHERE + b"echo ok\n")

    async def runs():
        b.warm_pool.bash[BASH_BIN] = "/nonexistent/bash-zygote.so"  # its start fails
        first = await b.run(spec)
        return first, await b.run(spec)

    try:
        first, second = asyncio.run(runs())
        assert b.warm_pool.bash[BASH_BIN] == "" and b.warm_pool.disabled is None
        assert (NATIVE, b"") in b.warm_pool.idle and (BASH + BASH_BIN, b"") not in b.warm_pool.idle
    finally:
        b.close()
    assert first.status is Status.success and b"ok" in first.stdout and not first.warm
    assert second.status is Status.success and second.warm and not _in_warm_bash(second.stdout)
