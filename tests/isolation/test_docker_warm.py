"""Warm Docker (isolation/docker_warm.py): jobs forked in an already running container
of the image. The conformance suite runs it too (``docker+warm``, ``docker+exec``);
these are what a long-lived container adds: reuse, nothing of one job in the next, a
dead container replaced (between jobs and mid-job), clean-up on close and by the sweep
of a dead worker's leftovers, the warm container's hardening as dockerd reports it, the
option (cold stays available; ``warm: true`` refuses where it cannot run). Real dockerd."""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import signal
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
from sandmill.isolation import RunSpec, Status
from test_conformance import explain, spec

docker = pytest.importorskip("docker")
from sandmill.isolation.docker import DockerBackend  # noqa: E402
from sandmill.isolation.docker_sweep import sweep_stale  # noqa: E402
from sandmill.isolation.docker_warm import WARM_LABEL  # noqa: E402

pytestmark = pytest.mark.timeout(120)
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def available() -> None:
    b = DockerBackend(warm=True)
    probe = b.probe()
    b.close()
    if not probe.available:
        if _in_ci():
            pytest.fail(f"CI runs warm docker, but: {probe.reason}")
        pytest.skip(f"warm docker unavailable: {probe.reason}")


@pytest.fixture
def tag(available: None) -> str:
    return secrets.token_hex(8)


@pytest.fixture
def backend(tag: str, tmp_path: Path):
    root = tmp_path / "jobs"
    root.mkdir()
    b = DockerBackend(workdir_root=str(root), labels={"sandmill.test": tag}, warm=True)
    yield b
    b.close()


def ours(tag: str, warm: bool = True) -> list[dict]:
    """This test's containers (any state); only warm ones with ``warm``."""
    labels = [f"sandmill.test={tag}"] + ([f"{WARM_LABEL}=1"] if warm else [])
    return docker.APIClient().containers(all=True, filters={"label": labels})


def job(code: str) -> RunSpec:
    """A python3 job as the worker makes one: the same runtime script (run in-process
    by a warm interpreter of that script) runs the job's main.py."""
    return spec(code, wall_s=30)


async def test_jobs_share_one_container(backend: DockerBackend, tag: str) -> None:
    outs = [await backend.run(job("print('ok')")) for _ in range(4)]
    assert all(o.status is Status.success and o.warm and o.stdout == b"ok\n" for o in outs), \
        [explain(o) for o in outs]
    assert len(ours(tag)) == 1  # one job at a time: one warm container, reused
    bash = RunSpec(argv=["/bin/bash", "main.sh"], env=ENV, files={"main.sh": b"echo \"hi $1\"\n"})
    bash.argv.append("there")
    o = await backend.run(bash)  # a warm exec: fresh namespaces, no fresh container
    assert o.status is Status.success and o.warm and o.stdout == b"hi there\n", explain(o)


async def test_nothing_of_a_job_reaches_the_next(backend: DockerBackend) -> None:
    first = ("import json, os\njson.LEAKED = 1\nopen('/tmp/left', 'w').write('x')\n"
             "open('mine', 'w').write('x')\nos.makedirs('/dev/shm/d', exist_ok=True)\n")
    o1 = await backend.run(job(first))
    assert o1.status is Status.success and o1.warm, explain(o1)
    second = ("import json, os\n"
              "print(hasattr(json, 'LEAKED'), os.listdir('/tmp'), sorted(os.listdir('.')),"
              " os.listdir('/dev/shm'))\n")
    o2 = await backend.run(job(second))
    assert o2.warm and o2.stdout == b"False [] ['main.py', 'run.py'] []\n", explain(o2)


async def test_no_capabilities_no_other_processes_no_extra_syscalls(backend: DockerBackend) -> None:
    code = textwrap.dedent("""\
        import ctypes, errno, os
        st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)
        print(st['CapEff'].strip(), st['NoNewPrivs'].strip(), st['Seccomp'].strip())
        print(os.getpid(), sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), os.getuid())
        libc = ctypes.CDLL(None, use_errno=True)
        # keyctl(KEYCTL_GET_KEYRING_ID) and bpf(BPF_MAP_CREATE): refused by the profile
        for nr in {"x86_64": (250, 321), "aarch64": (219, 280)}[os.uname().machine]:
            print(libc.syscall(nr, 0, 0, 0), errno.errorcode[ctypes.get_errno()])
        """)
    o = await backend.run(job(code))
    assert o.status is Status.success and o.warm, explain(o)
    caps, procs, keyctl, bpf = o.stdout.decode().splitlines()
    assert caps == "0000000000000000 1 2"  # no capability, no_new_privs, a seccomp filter
    assert procs == "1 [1] 65534"  # pid 1 of its own pid namespace, the job uid
    assert keyctl == "-1 EPERM" and bpf == "-1 EPERM"


async def test_container_killed_between_jobs_is_replaced(backend: DockerBackend, tag: str) -> None:
    assert (await backend.run(job("print(1)"))).warm
    [before] = ours(tag)
    docker.APIClient().kill(before["Id"])
    await asyncio.sleep(0.3)
    o = await backend.run(job("print(2)"))
    assert o.status is Status.success and o.warm and o.stdout == b"2\n", explain(o)
    [after] = ours(tag)
    assert after["Id"] != before["Id"]


async def test_container_killed_mid_job(backend: DockerBackend, tag: str) -> None:
    assert (await backend.run(job("print(1)"))).warm
    [before] = ours(tag)
    seen = asyncio.Event()
    streamed: list[bytes] = []

    def on_output(stream: str, chunk: bytes) -> None:
        streamed.append(chunk)
        seen.set()

    task = asyncio.ensure_future(backend.run(
        job("import time\nprint('started', flush=True)\ntime.sleep(60)\n"), on_output))
    await asyncio.wait_for(seen.wait(), 20)
    docker.APIClient().kill(before["Id"])
    o = await asyncio.wait_for(task, 20)
    assert o.status is Status.sandbox_error and "died during the job" in o.detail, explain(o)
    assert b"".join(streamed) == b"started\n"  # it ran once, and is not run again (cold)
    o2 = await backend.run(job("print(2)"))
    assert o2.status is Status.success and o2.warm, explain(o2)
    assert [c["Id"] for c in ours(tag)] != [before["Id"]]


async def test_close_removes_every_warm_container(tag: str, tmp_path: Path) -> None:
    b = DockerBackend(workdir_root=str(tmp_path), labels={"sandmill.test": tag}, warm=True)
    outs = await asyncio.gather(*(b.run(job("import time; time.sleep(0.5)")) for _ in range(2)))
    assert all(o.warm for o in outs), [explain(o) for o in outs]
    assert len(ours(tag)) == 2  # two jobs at once: two containers
    b.close()
    assert ours(tag) == []
    assert os.listdir(tmp_path) == []  # zygote dirs gone too


async def test_cold_stays_available(tag: str, tmp_path: Path) -> None:
    b = DockerBackend(workdir_root=str(tmp_path), labels={"sandmill.test": tag}, warm=False)
    try:
        assert "warm: false" in b.probe().reason
        o = await b.run(job("print('cold')"))
        assert o.status is Status.success and not o.warm, explain(o)
        assert ours(tag, warm=False) == []  # its container is gone with the job
    finally:
        b.close()


@pytest.fixture
def image_without_python(available: None):
    """An image whose warm container cannot start a zygote (no interpreter at all)."""
    name = f"sandmill/test-nopython:{secrets.token_hex(4)}"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        data = b"nothing here\n"
        info = tarfile.TarInfo("README")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    docker.APIClient().import_image_from_data(buf.getvalue(), repository=name.split(":")[0],
                                              tag=name.split(":")[1])
    yield name
    docker.APIClient().remove_image(name, force=True)


def test_warm_true_refuses_where_it_cannot_run(image_without_python: str) -> None:
    b = DockerBackend(image=image_without_python, warm=True)
    probe = b.probe()
    assert not probe.available and "warm: true" in probe.reason and "warm probe" in probe.reason, probe
    auto = DockerBackend(image=image_without_python)  # default: warm where it works
    probe = auto.probe()
    assert probe.available and "warm unavailable" in probe.reason, probe
    assert auto.warm is not None and auto.warm.pool.disabled
    b.close()
    auto.close()


def test_apparmor_host_runs_cold_unless_warm_is_asked_for() -> None:
    """Warm containers run without docker-default (it denies mount): on a host whose
    dockerd applies AppArmor, only ``warm: true`` may drop it; unset runs cold, saying why.
    (This machine has no AppArmor: dockerd's answer is made to say it has.)"""
    from sandmill.isolation.docker_warm import APPARMOR_OPT_IN

    auto = DockerBackend()
    real = auto.api.info
    auto.api.info = lambda: {**real(), "SecurityOptions": ["name=apparmor", "name=seccomp,profile=builtin"]}
    try:
        probe = auto.probe()
        assert probe.available and APPARMOR_OPT_IN in probe.reason, probe
        assert auto.warm is not None and auto.warm.pool.disabled
    finally:
        auto.close()


CHILD = """
import asyncio, sys
sys.path[:0] = {path!r}
from sandmill.isolation import Limits, RunSpec
from sandmill.isolation.docker import DockerBackend
b = DockerBackend(workdir_root={root!r}, labels={{"sandmill.test": {tag!r}}}, warm=True)
spec = RunSpec(argv=["/usr/bin/python3", "run.py"], env={{}}, files={{"run.py": b"print(1)"}},
               limits=Limits(wall_s=30), warm="run.py")
o = asyncio.run(b.run(spec))
print("warm" if o.warm else "cold", flush=True)
sys.stdin.read()
"""


def test_dead_workers_warm_container_is_swept(tag: str, tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(path=sys.path, root=str(tmp_path), tag=tag)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"warm\n"
        assert len(ours(tag)) == 1
        child.send_signal(signal.SIGKILL)  # no close(): its warm container stays behind
        child.wait()
        assert len(ours(tag)) == 1
        removed = sweep_stale(pids={child.pid})
        assert removed and ours(tag) == []
    finally:
        child.kill()
        child.wait()


async def test_hardening_as_dockerd_sees_it(backend: DockerBackend, tag: str) -> None:
    assert (await backend.run(job("print(1)"))).warm
    [c] = ours(tag)
    info = docker.APIClient().inspect_container(c["Id"])
    host, cfg = info["HostConfig"], info["Config"]
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"] and not host["Privileged"]
    assert host["ReadonlyRootfs"] and host["NetworkMode"] == "none" and cfg["NetworkDisabled"]
    assert cfg["User"] == "65534:65534"
    assert "no-new-privileges" in host["SecurityOpt"]
    assert any(o.startswith("seccomp=") and '"keyctl"' in o for o in host["SecurityOpt"])
    assert not any(o.startswith(("seccomp=unconfined", "label=disable")) for o in host["SecurityOpt"])
    # AppArmor off only where dockerd applies it (its docker-default profile denies mount)
    apparmor = any("name=apparmor" in o for o in docker.APIClient().info().get("SecurityOptions") or [])
    assert ("apparmor=unconfined" in host["SecurityOpt"]) == apparmor
    assert host["MaskedPaths"] == ["/sys/firmware", "/sys/devices/virtual/powercap"]
    assert host["Memory"] > 0 and host["PidsLimit"] > 0


async def test_own_loopback_without_network(backend: DockerBackend) -> None:
    """As a cold container: no network, but a loopback of its own (the warm container's
    network namespace, which no job has a capability over)."""
    code = ("import socket\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "socket.create_connection(s.getsockname(), timeout=2); print('lo ok')\n"
            "print(sorted(n for _, n in socket.if_nameindex()))\n")
    o = await backend.run(job(code))
    assert o.status is Status.success and o.warm and o.stdout == b"lo ok\n['lo']\n", explain(o)


def test_worker_asking_for_warm_docker_where_it_cannot_run_refuses_to_start(make_cluster,
                                                                            image_without_python: str) -> None:
    """``warm: true`` in a profile never runs colder than configured: the worker exits 2."""
    c = make_cluster()
    p = c.start_worker(profile_text=f"name: warmless\ntags: [warmless]\n"
                                    f"backend: {{kind: docker, image: '{image_without_python}', warm: true}}\n")
    assert p.wait(timeout=90) == 2
    out = (c.tmp / f"proc-{c.procs.index(p)}.log").read_text(errors="replace")
    assert "backend docker is not available here" in out and "warm: true" in out, out


async def test_image_env_reaches_a_warm_job_only_when_asked(tag: str, tmp_path: Path) -> None:
    """``clear_image_env: false``: the image's ENV, then the job's, as in a cold container."""
    code = "import os\nprint(os.environ.get('PATH'), os.environ.get('ONLY'), 'LANG' in os.environ)\n"
    image_path = docker.APIClient().inspect_image("sandmill/job:bookworm")["Config"].get("Env") or []
    for clear in (True, False):
        b = DockerBackend(workdir_root=str(tmp_path), labels={"sandmill.test": tag}, warm=True,
                          clear_image_env=clear)
        try:
            s = spec(code, env={"ONLY": "job"})
            s.env.pop("LANG")
            o = await b.run(s)
        finally:
            b.close()
        assert o.status is Status.success and o.warm, explain(o)
        image_env = dict(v.partition("=")[::2] for v in image_path)
        expect_lang = not clear and "LANG" in image_env
        assert o.stdout == f"{ENV['PATH']} job {expect_lang}\n".encode(), (clear, explain(o))
