"""The native exec zygote (isolation/launcher.c, launcher.py): its build, its message, its
protocol spoken directly, and the warm pool's use of it (the conformance suite's ``+exec``
variants run every guarantee through it; ``+pyexec`` through the Python one)."""

from __future__ import annotations

import array
import asyncio
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from sandmill.isolation import Limits, Mount, RunSpec, launcher, workdir
from sandmill.isolation.cgroups import JobCgroup
from sandmill.isolation.nsjail import NsjailBackend
from sandmill.isolation.process import ProcessBackend
from sandmill.isolation.warm import NATIVE, JobRequest, WarmError

pytestmark = pytest.mark.timeout(60)
ENV = {"PATH": "/usr/bin:/bin"}


def test_build_is_cached_and_can_be_switched_off(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = launcher.build()
    assert path is not None and os.access(path, os.X_OK)
    assert os.stat(path).st_mode & 0o777 == 0o755  # the job uid runs it
    launcher.build.cache_clear()
    try:
        monkeypatch.setenv("SANDMILL_LAUNCHER", "0")
        assert launcher.build() is None
        launcher.build.cache_clear()
        monkeypatch.delenv("SANDMILL_LAUNCHER")
        monkeypatch.setenv("SANDMILL_CACHE_DIR", str(tmp_path))
        monkeypatch.setenv("CC", "/bin/false")  # a failed build: none, and no half-written file
        assert launcher.build() is None
        assert list(tmp_path.iterdir()) == []
    finally:
        launcher.build.cache_clear()


def _fields(msg: bytes) -> list[bytes]:
    assert msg[:1] == b"K" and msg.endswith(b"\0")
    return msg[1:-1].split(b"\0")


def test_encode_carries_every_field_and_refuses_what_it_cannot() -> None:
    req = JobRequest(dir="/job/w1", mount="/job", argv=[], env={"A": "1", "B": "x=y"},
                     rlimits=[(7, 64, 64), (4, 0, 0), (0, -1, -1)], tmp_bytes=1024,
                     hostname="h", exec=["/bin/bash", "-c", "echo ünï"])
    f = _fields(launcher.encode(req))
    assert f == [b"/job/w1", b"/job", b"1024", b"h", b"3", b"7", b"64", b"64", b"4", b"0", b"0",
                 b"0", str(2**64 - 1).encode(), str(2**64 - 1).encode(),
                 b"3", b"/bin/bash", b"-c", "echo ünï".encode(), b"2", b"A=1", b"B=x=y"]
    with pytest.raises(WarmError, match="NUL"):
        launcher.encode(JobRequest(dir="/d", mount="/m", argv=[], env={"A": "a\0b"}, rlimits=[],
                                   tmp_bytes=None, exec=["/bin/true"]))
    with pytest.raises(WarmError, match="mounts"):
        launcher.encode(JobRequest(dir="/d", mount="/m", argv=[], env={}, rlimits=[], tmp_bytes=None,
                                   exec=["/bin/true"], mounts=[["/a", "/b"]]))


def _recv(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    return sock.recv(65536)


@pytest.mark.skipif(os.geteuid() != 0, reason="clones into user namespaces as a mapped uid")
def test_protocol_spoken_directly() -> None:
    """R; F -> W; a malformed K -> E and no exec; a good K -> the program runs with
    exactly its argv, env, dir and rlimits; Z carries each job process's wait status."""
    tmp_path = Path(tempfile.mkdtemp(dir="/var/tmp"))  # not under /tmp: the job gets a tmpfs there
    path = launcher.build()
    assert path is not None
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

    def ignoring() -> None:  # what a careless parent leaves: the zygote resets it for its jobs
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])

    proc = subprocess.Popen([path, str(theirs.fileno())], pass_fds=(theirs.fileno(),), preexec_fn=ignoring,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    theirs.close()
    try:
        assert _recv(ours) == b"R"

        def fork() -> socket.socket:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.sendmsg([b"F"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [b.fileno()]))])
            b.close()
            assert _recv(a) == b"W"
            return a

        job = fork()
        null = os.open(os.devnull, os.O_RDWR)
        job.sendmsg([b"K/nonexistent\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [null] * 3))])
        err = _recv(job)
        assert err.startswith(b"E") and b"bad job message" in err
        assert struct.unpack("ii", _recv(ours)[1:]) == (1, 121 << 8)

        job = fork()
        d = tmp_path / "w"
        d.mkdir()
        out_r, out_w = os.pipe()
        req = JobRequest(dir=str(d), mount=str(tmp_path), argv=[], env={"X": "a b", "Y": ""},
                         rlimits=[(7, 33, 33)], tmp_bytes=None,
                         exec=["/bin/bash", "-c", 'echo "$0|$1|$X|${Y-unset}|$(ulimit -n)|$PWD|$(id -u)"', "zero", "one"])
        job.sendmsg([launcher.encode(req)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              array.array("i", [null, out_w, out_w]))])
        os.close(out_w)
        assert _recv(job) == b""  # its socket closes as the program starts
        assert struct.unpack("ii", _recv(ours)[1:]) == (2, 0)
        assert os.read(out_r, 4096) == f"zero|one|a b||33|{tmp_path}|0\n".encode()
        os.close(out_r)

        job = fork()  # no signal ignored or blocked in the program (an exec keeps both)
        out_r, out_w = os.pipe()
        req.exec = ["/bin/grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]
        job.sendmsg([launcher.encode(req)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                              array.array("i", [null, out_w, out_w]))])
        os.close(out_w)
        assert _recv(job) == b""
        assert struct.unpack("ii", _recv(ours)[1:]) == (3, 0)
        assert os.read(out_r, 4096).split() == [b"SigBlk:", b"0" * 16, b"SigIgn:", b"0" * 16]
        os.close(out_r)
        os.close(null)

        # M: the zygote moves itself into the cgroup whose files come with it, says "m",
        # and its next clone is born there
        cg = JobCgroup.create(memory_bytes=None, pids=None, prefix="launcher-test")
        try:
            fds = [os.open(f, os.O_WRONLY) for f in cg.move_files()]
            ours.sendmsg([b"M"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            for fd in fds:
                os.close(fd)
            assert _recv(ours) == b"m"
            assert proc.pid in cg.pids()
            job = fork()
            assert len(cg.pids()) == 2  # the zygote and its new job process
            job.close()  # the job process ends unstarted (its worker is gone)
            assert struct.unpack("ii", _recv(ours)[1:])[0] == 4
            home = JobCgroup(cg.host, {k: d.parent for k, d in cg.dirs.items()})
            fds = [os.open(f, os.O_WRONLY) for f in home.move_files()]
            ours.sendmsg([b"M"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
            for fd in fds:
                os.close(fd)
            assert _recv(ours) == b"m" and cg.pids() == []
        finally:
            cg.remove()
    finally:
        ours.close()  # the zygote's end: it exits
        assert proc.wait(10) == 0
        shutil.rmtree(tmp_path)


def _bash(cmd: str, mounts: list[Mount] | None = None) -> RunSpec:
    return RunSpec(argv=["/bin/bash", "-c", cmd], env=ENV, files={}, limits=Limits(wall_s=10),
                   mounts=mounts or [])


@pytest.mark.parametrize("cls", [ProcessBackend, NsjailBackend])
async def test_exec_jobs_use_it_and_jobs_with_mounts_the_python_zygote(cls: type, tmp_path: Path) -> None:
    b = cls(warm=True, workdir_root=str(workdir.owner_root(workdir.default_root())))
    if not b.probe().available or b.warm_pool is None:
        pytest.skip("no warm pool for this backend here")
    try:
        o = await b.run(_bash("echo $$; cat /proc/self/status | grep CapEff"))
        assert o.warm and o.stdout.decode().split()[0] == "1", o  # pid 1 of its own namespace
        assert "CapEff:\t0000000000000000" in o.stdout.decode()
        assert list(b.warm_pool.idle) == [(NATIVE, b"")]
        root = b.warm_pool.mount_roots
        if root:  # a job with a mount of its own: the Python exec zygote binds it
            src = Path(root[0])
            o = await b.run(_bash("true", [Mount(source=str(src), target="/opt/m")]))
            assert (b.warm_pool.python, b"") in b.warm_pool.idle
    finally:
        b.close()


async def test_a_launcher_that_fails_falls_back_to_the_python_zygote(tmp_path: Path) -> None:
    b = ProcessBackend(warm=True, workdir_root=str(workdir.owner_root(workdir.default_root())))
    if b.warm_pool is None:
        pytest.skip("no warm pool for the process backend here")
    try:
        b.warm_pool.launcher = "/bin/false"  # exits at once: never ready
        o = await b.run(_bash("echo 1"))
        assert o.stdout == b"1\n" and not o.warm  # this one ran cold
        assert b.warm_pool.launcher == "" and b.warm_pool.disabled is None
        o = await b.run(_bash("echo 2"))
        assert o.stdout == b"2\n" and o.warm
        assert list(b.warm_pool.idle) == [(b.warm_pool.python, b"")]
    finally:
        b.close()
