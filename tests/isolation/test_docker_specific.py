"""Docker backend specifics beyond the conformance suite: the container's hardening as
dockerd sees it, nothing left behind (containers, work dirs, parent cgroups) after any
ending, usage numbers, and Docker-only failure modes. Real dockerd, no mocks."""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
from pathlib import Path

import pytest

from sandmill.isolation import Limits, RunSpec, Status
from support import SLOWDOWN

docker = pytest.importorskip("docker")
from sandmill.isolation import docker_cgroup as cg  # noqa: E402
from sandmill.isolation.docker import LABEL, DockerBackend  # noqa: E402

pytestmark = pytest.mark.timeout(90)
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
PY = "/usr/bin/python3"


@pytest.fixture(scope="module")
def available() -> None:
    probe = DockerBackend().probe()
    if not probe.available:
        pytest.skip(f"docker unavailable: {probe.reason}")


@pytest.fixture
def tag(available: None) -> str:
    """A label value unique to this test: our containers, and only ours."""
    return secrets.token_hex(8)


@pytest.fixture
def backend(tag: str, tmp_path: Path) -> DockerBackend:
    root = tmp_path / "jobs"
    root.mkdir()
    # A fresh container per job (cold): warm containers have tests of their own
    # (test_docker_warm.py).
    return DockerBackend(workdir_root=str(root), labels={"sandmill.test": tag}, warm=False)


def ours(tag: str) -> list[dict]:
    """Every container (any state) carrying this test's label."""
    return docker.APIClient().containers(all=True, filters={"label": f"sandmill.test={tag}"})


def assert_clean(backend: DockerBackend, tag: str) -> None:
    assert ours(tag) == [], "a container outlived its run"
    assert os.listdir(backend.workdir_root or "") == [], "a work dir outlived its run"


def py(code: str, **limits: object) -> RunSpec:
    return RunSpec(argv=[PY, "-c", code], env=ENV, limits=Limits(**{"wall_s": 20, **limits}))


async def test_hardening_as_dockerd_sees_it(backend: DockerBackend, tag: str) -> None:
    seen: dict = {}
    ready = asyncio.Event()

    def on_output(name: str, chunk: bytes) -> None:
        if b"ready" in chunk and not ready.is_set():
            ready.set()

    task = asyncio.create_task(backend.run(
        py("import time; print('ready', flush=True); time.sleep(3)", memory_mb=96, pids=17, tmp_mb=8),
        on_output))
    await asyncio.wait_for(ready.wait(), 15)
    (c,) = ours(tag)
    info = docker.APIClient().inspect_container(c["Id"])
    seen.update(host=info["HostConfig"], config=info["Config"])
    await task
    host, config = seen["host"], seen["config"]
    assert host["ReadonlyRootfs"] is True
    assert host["NetworkMode"] == "none" and config.get("NetworkDisabled") is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges" in host["SecurityOpt"]
    assert host["Init"] is True
    assert host["Memory"] == host["MemorySwap"] == 96 << 20
    assert host["PidsLimit"] == 18  # + docker-init
    assert "size=8m" in host["Tmpfs"]["/tmp"] and "mode=1777" in host["Tmpfs"]["/tmp"]
    assert config["User"] == "65534:65534"
    assert config["Labels"][LABEL] == "1"
    assert config["OpenStdin"] and config["StdinOnce"]
    assert {u["Name"] for u in host["Ulimits"]} >= {"core", "fsize", "nofile"}
    assert_clean(backend, tag)


@pytest.mark.parametrize("case", ["success", "timeout", "output_limit", "memory_limit", "sandbox_error"])
async def test_nothing_left_behind(backend: DockerBackend, tag: str, case: str) -> None:
    specs = {
        "success": py("print('hi')"),
        "timeout": py("import time; time.sleep(30)", wall_s=1),
        "output_limit": py("import sys\nwhile True: sys.stdout.write('x' * 4096)", output_bytes=10000),
        "memory_limit": py("x = b'1' * (200 << 20)", memory_mb=48),
        "sandbox_error": RunSpec(argv=["/bin/true"], env=ENV, files={"../escape": b"x"}),
    }
    o = await backend.run(specs[case])
    assert o.status.value == case, (o.status, o.detail, o.stderr[-300:])
    assert_clean(backend, tag)


@pytest.mark.parametrize("after_s", [0.0, 0.005, 0.02, 0.05, 0.15, 1.0])
async def test_cancel_removes_container(backend: DockerBackend, tag: str, after_s: float) -> None:
    """Cancelled before create returns, during start, and while running."""
    task = asyncio.create_task(backend.run(py("import time; time.sleep(60)", wall_s=50)))
    await asyncio.sleep(after_s)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_clean(backend, tag)


async def test_missing_image_is_sandbox_error(tag: str, tmp_path: Path) -> None:
    b = DockerBackend(image=f"sandmill/no-such-image:{tag}", workdir_root=str(tmp_path))
    assert not b.probe().available
    o = await b.run(RunSpec(argv=["/bin/true"], env=ENV))
    assert o.status is Status.sandbox_error and "build.sh" in o.detail
    assert os.listdir(tmp_path) == []


async def test_usage_reported(backend: DockerBackend) -> None:
    o = await backend.run(py("x = b'1' * (80 << 20)\nimport time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.3: pass"))
    assert o.status is Status.success
    if not backend._is_local():
        pytest.skip("remote dockerd: usage is not readable")
    assert o.peak_memory_kb >= 80 << 10, o
    assert o.cpu_ms >= 250, o


async def test_parent_cgroup_removed(backend: DockerBackend, tag: str) -> None:
    if backend._cgroup_driver() != "cgroupfs" or not backend._is_local():
        pytest.skip("per-job parent cgroups are used with the local cgroupfs driver only")
    ready = asyncio.Event()
    task = asyncio.create_task(backend.run(
        py("import time; print('ready', flush=True); time.sleep(1)"),
        lambda name, chunk: ready.set()))
    await asyncio.wait_for(ready.wait(), 15)
    (c,) = ours(tag)
    job_id = c["Labels"][f"{LABEL}.id"]
    rel = cg.job_parent(job_id).strip("/")
    sub = "memory" if cg.cgroup_version() == 1 else ""
    assert os.path.isdir(os.path.join(cg.ROOT, sub, rel)), "the job should run in its parent cgroup"
    assert (await task).status is Status.success
    assert not os.path.exists(os.path.join(cg.ROOT, sub, rel))
    if cg.cgroup_version() == 1:
        left = [h for h in os.listdir(cg.ROOT) if os.path.exists(os.path.join(cg.ROOT, h, rel))]
        assert not left, f"parent cgroup left in {left}"


async def test_collect_does_not_follow_symlinks(backend: DockerBackend) -> None:
    o = await backend.run(RunSpec(
        argv=["/bin/bash", "-c", "ln -s /etc/passwd p; mkdir d; ln -s /etc d2; echo ok > real"],
        env=ENV, collect=["p", "d2/passwd", "real", "../etc/passwd"]))
    assert o.status is Status.success
    assert o.files == {"real": b"ok\n"}


async def test_big_stdin_and_stderr(backend: DockerBackend) -> None:
    """5 MB in while writing to both streams: the stdin writer must not deadlock."""
    data = os.urandom(5 << 20)
    code = ("import sys, hashlib\nsys.stderr.write('e' * 200000)\n"
            "print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())")
    o = await backend.run(RunSpec(argv=[PY, "-c", code], env=ENV, stdin=data))
    assert o.status is Status.success, o.stderr[-300:]
    assert o.stdout.strip().decode() == hashlib.sha256(data).hexdigest()
    assert o.stderr == b"e" * 200000


async def test_cpu_limit_whole_job(backend: DockerBackend) -> None:
    """Four busy children, each under RLIMIT_CPU: the cgroup watchdog still stops them."""
    if not backend._is_local():
        pytest.skip("the whole-job CPU watchdog needs the host's cgroupfs")
    code = ("import os\nfor _ in range(4):\n    if os.fork() == 0:\n        while True: pass\n"
            "os.wait()")
    o = await backend.run(py(code, cpu_s=1, wall_s=30))
    assert o.status is Status.cpu_limit, (o.status, o.cpu_ms)
    assert o.wall_ms < 5000 * SLOWDOWN


async def test_network_host(backend: DockerBackend) -> None:
    o = await backend.run(RunSpec(argv=["/bin/bash", "-c", "cat /proc/net/dev | wc -l"], env=ENV,
                                  network="host"))
    assert o.status is Status.success
    host_ifaces = len(Path("/proc/net/dev").read_text().splitlines())
    assert int(o.stdout) == host_ifaces


async def test_own_loopback_without_network(backend: DockerBackend) -> None:
    """network none still gives the job its own lo (a local server/client pair works)."""
    code = ("import socket\ns = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "socket.create_connection(s.getsockname(), timeout=2); print('lo ok')")
    o = await backend.run(py(code))
    assert o.status is Status.success and o.stdout == b"lo ok\n", (o.status, o.stderr[-300:])
