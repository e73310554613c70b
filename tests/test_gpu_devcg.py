"""The device cgroup of GPU jobs (isolation/devices_cgroup.py) on nsjail and process, with
stand-in nodes: a GPU job may open exactly the nodes its sandbox gives it (the allow list
the kernel holds while it runs), a node it was not given fails with EPERM even where a
path reaches it (a node mknod'ed by the test into a dir bound into the job), and a job
without a GPU gets no device cgroup (the same open succeeds). Needs root and cgroup v1 with
a devices hierarchy (this machine); elsewhere the probe declares the gap, checked too."""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandmill.isolation import Backend, Mount, RunSpec, Status, get_backend
from sandmill.isolation import devices_cgroup
from sandmill.isolation.cgroups import JobCgroup, detect
from sandmill.isolation.gpu import discover, job_env

PY = "/usr/bin/python3"
NULL, FULL, TUN = "c 1:3 rwm", "c 1:7 rwm", "c 10:200 rwm"
# What each backend's GPU job may open: its standard nodes and the stand-in GPU nodes (1:3).
EXPECTED = {
    "nsjail": {NULL, "c 1:5 rwm", "c 1:8 rwm", "c 1:9 rwm"},  # null zero random urandom
    "process": {NULL, "c 1:5 rwm", FULL, "c 1:8 rwm", "c 1:9 rwm", "c 5:0 rwm"},  # + full, tty
}

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or devices_cgroup.gap() is not None,
    reason=f"needs root and a cgroup v1 devices hierarchy: {devices_cgroup.gap()}")


def mknod(path: Path, major: int, minor: int) -> None:
    os.mknod(path, 0o666 | 0o020000, os.makedev(major, minor))
    os.chmod(path, 0o666)


@pytest.fixture
def dirs() -> Iterator[dict[str, Path]]:
    """Stand-in GPU nodes (1:3) and, apart, nodes no GPU job is given: ``full`` (1:7) and
    ``tun`` (10:200, opens for anyone, harmless without its ioctl), in /dev (devtmpfs: they
    open); an empty dir to bind them at (exists on the host: the process backend binds onto
    existing paths); a dir where the test drops the job's go file."""
    tag = uuid.uuid4().hex[:8]
    gpu = Path(f"/dev/sandmill-devcg-gpu-{tag}")
    other = Path(f"/dev/sandmill-devcg-other-{tag}")
    at = Path(f"/var/tmp/sandmill-devcg-at-{tag}")
    go = Path(f"/var/tmp/sandmill-devcg-go-{tag}")
    for d in (gpu, other, at, go):
        d.mkdir(mode=0o755)
    for n in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        mknod(gpu / n, 1, 3)
    mknod(other / "full", 1, 7)
    mknod(other / "tun", 10, 200)
    yield {"gpu": gpu, "other": other, "at": at, "go": go}
    for d in (gpu, other, at, go):
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=("process", "nsjail"))
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A cold backend with a cgroup parent of its own, so that the test sees its jobs only."""
    parent = f"sandmill-devcg-{uuid.uuid4().hex[:8]}"
    b = get_backend(request.param, cgroup_parent=parent, warm=False)
    probe = b.probe()
    if not probe.available:
        pytest.skip(probe.reason)
    b.test_parent = parent  # type: ignore[attr-defined]
    yield b
    b.close()
    for mount in {*detect().mounts.values(), devices_cgroup.v1_mount()}:
        if mount is not None and (mount / parent).is_dir():
            (mount / parent).rmdir()


PROBE = r"""
import json, os, sys, time
res = {}
for p in sys.argv[1].split(","):
    try:
        os.close(os.open(p, os.O_RDONLY))
        res[p] = 0
    except OSError as e:
        res[p] = e.errno
print(json.dumps(res), flush=True)
deadline = time.monotonic() + 50  # the test reads the job's cgroup, then lets it end
while not os.path.exists(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.02)
"""


async def run_and_look(b: Backend, dirs: dict[str, Path], gpu: list[int] | None,
                       try_open: list[str]) -> tuple[dict[str, int], list[list[str]]]:
    """Run PROBE; while it runs, read the devices.list of each job dir under the backend's
    parent. Returns (path -> errno of its open, 0 if it opened; the allow lists seen)."""
    go = dirs["go"] / "go"
    seen: list[list[str]] = []
    parent = devices_cgroup.v1_mount() / b.test_parent  # type: ignore[attr-defined,operator]

    def on_output(stream: str, chunk: bytes) -> None:
        if stream == "stdout" and b"\n" in chunk and not go.exists():
            for d in sorted(parent.glob("job-*")) if parent.is_dir() else []:
                seen.append(devices_cgroup.allowed(d))
            go.touch()

    grant = discover(dev_dir=str(dirs["gpu"]), only=None, ldconfig_output="").grant(gpu) if gpu else None
    spec = RunSpec(argv=[PY, "-u", "probe.py", ",".join(try_open), str(go)],
                   files={"probe.py": PROBE.encode()},
                   env={"PATH": "/usr/bin:/bin", **(job_env(grant) if grant else {})}, gpu=grant,
                   mounts=[Mount(str(dirs["other"]), str(dirs["at"])), Mount(str(dirs["go"]), str(dirs["go"]))])
    out = await b.run(spec, on_output)
    assert out.status is Status.success, (out.status, out.detail, out.stderr[-2000:])
    return json.loads(out.stdout.splitlines()[0]), seen


async def test_gpu_job_may_open_exactly_its_sandboxs_nodes(backend, dirs):
    at = dirs["at"]
    opened, seen = await run_and_look(backend, dirs, [1], ["/dev/nvidia1", "/dev/nvidiactl", "/dev/null",
                                                           f"{at}/tun", f"{at}/full"])
    assert len(seen) == 1 and set(seen[0]) == EXPECTED[backend.name], seen
    assert opened["/dev/nvidia1"] == opened["/dev/nvidiactl"] == opened["/dev/null"] == 0, opened
    # Reachable through a bind, but no node of its sandbox: the kernel refuses the open.
    assert opened[f"{at}/tun"] == errno.EPERM, opened
    # /dev/full is one of the process backend's standard nodes (devfs.py), not nsjail's.
    assert opened[f"{at}/full"] == (0 if backend.name == "process" else errno.EPERM), opened


async def test_job_without_gpu_gets_no_device_cgroup(backend, dirs):
    at = dirs["at"]
    opened, seen = await run_and_look(backend, dirs, None, [f"{at}/tun", f"{at}/full"])
    assert seen == [[]] or seen == [], seen  # a job dir only where devices shares a mount
    assert opened == {f"{at}/tun": 0, f"{at}/full": 0}, opened  # the same nodes open


def test_backends_declare_no_device_cgroup_gap_here(backend):
    assert devices_cgroup.GAP_KEY not in backend.probe().gaps
    assert backend.device_rules(RunSpec(argv=["true"])) is None  # no GPU: no device cgroup


def test_job_cgroup_with_devices_holds_exactly_the_rules(dirs):
    rules = devices_cgroup.rules(["/dev/null", str(dirs["gpu"] / "nvidia0"), str(dirs["other"] / "tun"),
                                  "/dev/null", "/nonexistent", "/etc/hostname"])
    assert rules == [NULL, TUN]  # real major:minor, each once; missing and plain files skipped
    parent = f"sandmill-devcg-{uuid.uuid4().hex[:8]}"
    cg = JobCgroup.create(None, None, parent=parent, devices=rules)
    try:
        d = cg.dirs["devices"]
        assert devices_cgroup.allowed(d) == rules
        assert str(d / "cgroup.procs") in cg.procs_files()  # the job's first process joins it
    finally:
        cg.remove()
    assert not d.exists()
    plain = JobCgroup.create(None, None, parent=parent)
    plain.remove()
    assert "devices" not in plain.dirs
    for mount in {*detect().mounts.values(), devices_cgroup.v1_mount()}:
        if mount is not None and (mount / parent).is_dir():
            (mount / parent).rmdir()
