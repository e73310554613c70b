"""GPU passthrough on a CPU-only machine: stand-in GPU nodes (character devices made like
/dev/null, 1:3) under a /dev subdirectory of the test's own stand for /dev/nvidia<N>,
/dev/nvidiactl and /dev/nvidia-uvm. Discovery, the grant, each backend passing exactly
the assigned nodes (and the driver files), the env, the profile's refusals, the pool's
assignment and waits, and the measurement's arithmetic."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandmill.isolation import Backend, RunSpec, Status, get_backend
from sandmill.isolation.docker_config import gpu_host_config, gpu_mode
from sandmill.isolation.gpu import GpuHost, discover, driver_libraries, job_env, parse_indexes
from sandmill.isolation.gpu_measure import GpuMeter, nvml_readers
from sandmill.profiles import ProfileError, load_profile, profile_from_dict
from sandmill.worker.gpus import GpuPool, gpu_pool
from sandmill.worker.settings import WorkerStartError

PY = "/usr/bin/python3"
BACKENDS = ("process", "nsjail", "docker")


def make_nodes(d: Path, names: tuple[str, ...]) -> None:
    d.mkdir(mode=0o755, exist_ok=True)
    for n in names:
        os.mknod(d / n, 0o666 | 0o020000, os.makedev(1, 3))  # a char device like /dev/null
        os.chmod(d / n, 0o666)


@pytest.fixture
def gpu_dev() -> Iterator[Path]:
    """Stand-in GPU nodes in a /dev subdirectory (devtmpfs: nodes there can be opened; a
    tmpfs /tmp may be nodev), removed afterwards."""
    d = Path("/dev") / f"sandmill-gpu-{uuid.uuid4().hex[:8]}"
    make_nodes(d, ("nvidia0", "nvidia1", "nvidia2", "nvidiactl", "nvidia-uvm"))
    (d / "nvidia7").write_text("not a device")  # a plain file is no GPU
    (d / "nvidia-caps").mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def driver_lib() -> Iterator[Path]:
    """A stand-in driver library outside the system dirs (nsjail must bind it itself),
    readable by the job's uid, outside every dir the process backend masks."""
    d = Path("/var/tmp") / f"sandmill-gpu-lib-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o755)
    lib = d / "libcuda.so.1"
    lib.write_text("stand-in libcuda\n")
    lib.chmod(0o644)
    yield lib
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    b = get_backend(request.param)
    probe = b.probe()
    if not probe.available:
        if os.environ.get("CI"):
            pytest.fail(f"{request.param} unavailable in CI: {probe.reason}")
        pytest.skip(probe.reason)
    yield b
    b.close()


PROBE = r"""
import glob, json, os, sys
out = {"nodes": sorted(glob.glob("/dev/nvidia*")), "opened": [], "refused": {},
       "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES")}}
for n in sys.argv[1].split(","):
    try:
        with open(n, "r+b", buffering=0) as f:
            f.write(b"x")
        out["opened"].append(n)
    except OSError as e:
        out["refused"][n] = e.errno
if len(sys.argv) > 2:
    out["lib"] = open(sys.argv[2]).read().strip()
print(json.dumps(out))
"""


def gpu_spec(host: GpuHost, indexes: list[int], try_open: list[str], extra: list[str] = ()) -> RunSpec:
    grant = host.grant(indexes)
    return RunSpec(argv=[PY, "-u", "probe.py", ",".join(try_open), *extra], files={"probe.py": PROBE.encode()},
                   env={"PATH": "/usr/bin:/bin", **job_env(grant)}, gpu=grant,
                   warm="probe.py")  # a warm-capable spec: with a GPU it must still run cold


def ran(out) -> dict:
    assert out.status is Status.success, (out.status, out.detail, out.stderr[-2000:])
    return json.loads(out.stdout)


# ---- discovery and the grant ------------------------------------------------------------------

def test_discovery_finds_the_nodes_by_index(gpu_dev):
    host = discover(dev_dir=str(gpu_dev), only=None, ldconfig_output="")
    assert host.indexes == [0, 1, 2]  # not the plain file nvidia7, not the nvidia-caps dir
    assert host.control == (str(gpu_dev / "nvidiactl"), str(gpu_dev / "nvidia-uvm"))
    assert "no driver library" in " ".join(host.notes)
    assert discover(dev_dir=str(gpu_dev), only=[0, 2], ldconfig_output="").indexes == [0, 2]
    assert parse_indexes(" 2,0 ") == [0, 2] and parse_indexes("") is None
    with pytest.raises(ValueError, match="SANDMILL_GPUS"):
        parse_indexes("gpu0")


def test_grant_is_the_assigned_nodes_and_the_driver_files(gpu_dev, driver_lib):
    ldconfig = (f"\tlibcuda.so.1 (libc6,x86-64) => {driver_lib}\n"
                f"\tlibc.so.6 (libc6,x86-64) => /lib/x86_64-linux-gnu/libc.so.6\n"
                "\tlibnvidia-ml.so.1 (libc6,x86-64) => /nonexistent/libnvidia-ml.so.1\n")
    assert driver_libraries(ldconfig) == [str(driver_lib)]  # driver libraries that exist, only
    host = discover(dev_dir=str(gpu_dev), only=None, ldconfig_output=ldconfig)
    g = host.grant([2])
    assert g.indexes == (2,)
    assert [(m.source, m.target, m.writable) for m in g.devices] == [
        (str(gpu_dev / "nvidia2"), "/dev/nvidia2", True), (str(gpu_dev / "nvidiactl"), "/dev/nvidiactl", True),
        (str(gpu_dev / "nvidia-uvm"), "/dev/nvidia-uvm", True)]
    assert [(m.source, m.target, m.writable) for m in g.files] == [(str(driver_lib), str(driver_lib), False)]
    assert job_env(host.grant([0, 2])) == {"CUDA_VISIBLE_DEVICES": "0,1", "NVIDIA_VISIBLE_DEVICES": "0,2"}


# ---- passthrough, per backend -----------------------------------------------------------------

async def test_job_sees_exactly_its_own_gpu(backend, gpu_dev, driver_lib):
    ldconfig = f"\tlibcuda.so.1 (libc6,x86-64) => {driver_lib}\n"
    host = discover(dev_dir=str(gpu_dev), only=None, ldconfig_output=ldconfig)
    out = await backend.run(gpu_spec(host, [1], ["/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"],
                                     [str(driver_lib)]))
    r = ran(out)
    assert r["nodes"] == ["/dev/nvidia-uvm", "/dev/nvidia1", "/dev/nvidiactl"]  # not nvidia0 or 2
    assert r["opened"] == ["/dev/nvidia1", "/dev/nvidiactl", "/dev/nvidia-uvm"], r["refused"]
    assert r["env"] == {"CUDA_VISIBLE_DEVICES": "0", "NVIDIA_VISIBLE_DEVICES": "1"}
    assert r["lib"] == "stand-in libcuda"  # the driver library, read-only at its host path
    assert not out.warm  # a GPU job never runs in a warm interpreter made without its nodes


async def test_two_gpus_for_one_job(backend, gpu_dev):
    host = discover(dev_dir=str(gpu_dev), only=None, ldconfig_output="")
    r = ran(await backend.run(gpu_spec(host, [0, 2], ["/dev/nvidia0", "/dev/nvidia2"])))
    assert r["nodes"] == ["/dev/nvidia-uvm", "/dev/nvidia0", "/dev/nvidia2", "/dev/nvidiactl"]
    assert r["opened"] == ["/dev/nvidia0", "/dev/nvidia2"]
    assert r["env"] == {"CUDA_VISIBLE_DEVICES": "0,1", "NVIDIA_VISIBLE_DEVICES": "0,2"}


async def test_a_missing_node_is_refused_not_dropped(backend, gpu_dev):
    host = discover(dev_dir=str(gpu_dev), only=None, ldconfig_output="")
    spec = gpu_spec(host, [1], ["/dev/nvidia1"])
    os.unlink(gpu_dev / "nvidia1")  # gone between discovery and the run
    out = await backend.run(spec)
    assert out.status is Status.sandbox_error and "nvidia1" in out.detail, out


async def test_jobs_without_gpu_keep_the_hosts_dev_on_process(gpu_dev):
    """The private /dev is for GPU jobs only: other jobs of the process backend see /dev as before."""
    b = get_backend("process", warm=False)
    try:
        out = await b.run(RunSpec(argv=[PY, "-c", f"import os; print(os.path.isdir({str(gpu_dev)!r}))"],
                                  env={"PATH": "/usr/bin:/bin"}))
    finally:
        b.close()
    assert out.stdout.strip() == b"True" and out.gpu is None and "gpu" not in out.to_json()


def test_docker_gpu_modes():
    assert gpu_mode({"Runtimes": {"runc": {}, "nvidia": {"path": "nvidia-container-runtime"}}}) == "nvidia"
    assert gpu_mode({"Runtimes": {"runc": {}}}) == "devices" and gpu_mode({}) == "devices"
    host = GpuHost(devices=(), control=())
    from sandmill.isolation.gpu import GpuDevice
    host = GpuHost(devices=(GpuDevice(3, "/dev/nvidia3"),), control=("/dev/nvidiactl",))
    spec = RunSpec(argv=["true"], gpu=host.grant([3]))
    req, = gpu_host_config(spec, "nvidia")["device_requests"]
    assert req["Driver"] == "nvidia" and req["DeviceIDs"] == ["3"] and ["gpu", "compute", "utility"] in req["Capabilities"]
    assert gpu_host_config(spec, "devices")["devices"] == ["/dev/nvidia3:/dev/nvidia3:rwm",
                                                           "/dev/nvidiactl:/dev/nvidiactl:rwm"]


# ---- the profile ------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, field, reason", [
    ({"gpus_per_job": 0}, "gpus_per_job", "gpus_per_job must be 1 to 16"),
    ({"gpus_per_job": 17}, "gpus_per_job", "gpus_per_job must be 1 to 16"),
    ({"gpus_per_job": True}, "gpus_per_job", "valid integer"),
    ({"gpus_per_job": "one"}, "gpus_per_job", "valid integer"),
    ({"gpu_sharing": True}, "gpu_sharing", "gpu_sharing needs gpus_per_job"),
])
def test_profile_refuses_nonsense(raw, field, reason):
    with pytest.raises(ProfileError) as e:
        profile_from_dict({"name": "g", "tags": ["gpu"], **raw}, source="gpu.yaml")
    assert f"gpu.yaml: field '{field}'" in str(e.value) and reason in str(e.value)


def test_shipped_gpu_profile_gives_each_job_one_gpu():
    p = load_profile(Path(__file__).resolve().parents[1] / "profiles" / "gpu.yaml")
    assert p.gpus_per_job == 1 and not p.gpu_sharing and p.requires_gpu


# ---- the pool ---------------------------------------------------------------------------------

def pool_of(n: int, per_job: int = 1, sharing: bool = False) -> GpuPool:
    from sandmill.isolation.gpu import GpuDevice
    return GpuPool(GpuHost(devices=tuple(GpuDevice(i, f"/dev/nvidia{i}") for i in range(n))), per_job, sharing)


async def test_pool_two_jobs_two_gpus_third_waits_in_order():
    pool = pool_of(2)
    a, b, c, d = (uuid.uuid4() for _ in range(4))
    assert await pool.take(a) == [0] and await pool.take(b) == [1]
    third = asyncio.ensure_future(pool.take(c))
    fourth = asyncio.ensure_future(pool.take(d))
    await asyncio.sleep(0.05)
    assert not third.done() and not fourth.done() and pool.waiting() == 2  # no over-commit
    pool.release(b)
    assert await asyncio.wait_for(third, 1) == [1]  # first come, first served
    assert not fourth.done()
    pool.release(a)
    assert await asyncio.wait_for(fourth, 1) == [0]
    assert pool.state() == [{"index": 0, "name": "", "jobs": [str(d)]}, {"index": 1, "name": "", "jobs": [str(c)]}]


async def test_pool_cancel_while_waiting_gives_the_place_up():
    pool = pool_of(1)
    a, b, c = (uuid.uuid4() for _ in range(3))
    await pool.take(a)
    waiting = asyncio.ensure_future(pool.take(b))
    after = asyncio.ensure_future(pool.take(c))
    await asyncio.sleep(0.01)
    waiting.cancel()
    await asyncio.sleep(0.01)
    pool.release(a)
    assert await asyncio.wait_for(after, 1) == [0] and pool.waiting() == 0


async def test_pool_several_gpus_per_job_and_sharing():
    pool = pool_of(3, per_job=2)
    a, b = uuid.uuid4(), uuid.uuid4()
    assert await pool.take(a) == [0, 1]
    second = asyncio.ensure_future(pool.take(b))
    await asyncio.sleep(0.01)
    assert not second.done()  # one GPU free, two needed
    pool.release(a)
    assert await asyncio.wait_for(second, 1) == [0, 1]
    shared = pool_of(2, sharing=True)
    got = [await shared.take(uuid.uuid4()) for _ in range(5)]  # never waits: least busy first
    assert got == [[0], [1], [0], [1], [0]]


def test_worker_pool_from_profile(gpu_dev, monkeypatch):
    monkeypatch.setenv("SANDMILL_GPU_DEV_DIR", str(gpu_dev))
    monkeypatch.setenv("SANDMILL_GPUS", "1,2")
    base = {"name": "g", "tags": ["gpu"]}
    info: dict = {}
    pool = gpu_pool(profile_from_dict({**base, "gpus_per_job": 2}), info)
    assert pool is not None and pool.host.indexes == [1, 2] and info["gpus"] == ["nvidia1", "nvidia2"]
    with pytest.raises(WorkerStartError, match="gpus_per_job is 3 but this worker has 2 GPU"):
        gpu_pool(profile_from_dict({**base, "gpus_per_job": 3}), {})
    assert gpu_pool(profile_from_dict(base), {}) is None  # not a GPU group: nothing changes
    monkeypatch.setenv("SANDMILL_GPUS", "x")
    with pytest.raises(WorkerStartError, match="SANDMILL_GPUS"):
        gpu_pool(profile_from_dict({**base, "gpus_per_job": 1}), {})


# ---- the measurement --------------------------------------------------------------------------

def test_meter_peak_above_start_and_busy_time():
    samples = iter([(1000, 0), (5000, 100), (3000, 100), (2000, 0)] + [(2000, 0)] * 1000)
    m = GpuMeter([lambda: next(samples)], "nvml", interval_s=0.05)
    m.start()
    import time
    time.sleep(0.3)
    fig = m.stop()
    assert fig["peak_memory_bytes"] == 4000 and fig["measured"] == "nvml"
    assert 50 <= fig["busy_ms"] <= 1000, fig  # two samples at 100% of a ~50 ms interval


def test_without_nvml_the_figures_are_null_and_say_why():
    readers, why = nvml_readers([0])
    if readers is not None:
        pytest.skip("NVML answers here: a GPU host")
    assert why.startswith("not measured:")
    m = GpuMeter(readers, why)
    m.start()
    assert m.stop() == {"peak_memory_bytes": None, "busy_ms": None, "measured": why}
