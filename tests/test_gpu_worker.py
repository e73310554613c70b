"""A GPU group end to end, on stand-in GPU nodes (SANDMILL_GPU_DEV_DIR): a real server and
worker; concurrent jobs get different GPUs, a job finding none free waits, the env and the
outcome's GPU fields, each GPU's current job in the workers list and `sandmill workers`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import REPO, TOKEN, wait_done

JOB = """
import glob, os, time
def main(hold: float):
    nodes = sorted(glob.glob("/dev/nvidia*"))
    with open([n for n in nodes if n[11:].isdigit()][0], "r+b", buffering=0) as f:
        f.write(b"x")  # its own node opens
    t0 = time.time()
    time.sleep(hold)
    return {"nodes": nodes, "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "nvd": os.environ.get("NVIDIA_VISIBLE_DEVICES"), "t0": t0, "t1": time.time()}
"""
PROFILE = """name: {name}
tags: [{tag}]
backend: {{kind: process}}
subworkers: 3
gpus_per_job: 1
limits: {{wall_s: 60}}
"""


@pytest.fixture
def gpu_dev() -> Iterator[Path]:
    d = Path("/dev") / f"sandmill-gpuw-{uuid.uuid4().hex[:8]}"
    d.mkdir(mode=0o755)
    for n in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm"):
        os.mknod(d / n, 0o666 | 0o020000, os.makedev(1, 3))  # stand-ins made like /dev/null
        os.chmod(d / n, 0o666)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def submit(api, ws: str, tag: str, hold: float) -> str:
    r = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                 json={"content": JOB, "language": "python3", "args": {"hold": hold}})
    assert r.status_code == 201, r.text
    return r.text


def test_gpu_jobs_get_their_own_gpu_and_a_third_waits(make_cluster, ws, gpu_dev, tmp_path):
    c = make_cluster()
    group, tag = f"gpu-{uuid.uuid4().hex[:6]}", f"gpu-{uuid.uuid4().hex[:6]}"
    prof = tmp_path / "gpu.yaml"
    prof.write_text(PROFILE.format(name=group, tag=tag))
    c.spawn("worker", "--profile", str(prof), env={"SANDMILL_GPU_DEV_DIR": str(gpu_dev)})
    c.wait_workers(group)
    with c.client() as api:
        ids = [submit(api, ws, tag, 4.0) for _ in range(3)]
        # while two run: each GPU is held by one of our jobs, as the workers list shows
        deadline, held = time.time() + 30, []
        while time.time() < deadline:
            w = next(w for w in api.get("/api/workers/list").json() if w["worker_group"] == group)
            held = [g["jobs"] for g in w["gpu_jobs"]]
            if len(held) == 2 and all(len(j) == 1 for j in held):
                break
            time.sleep(0.1)
        assert [g["index"] for g in w["gpu_jobs"]] == [0, 1] and all(len(j) == 1 for j in held), w
        assert {j[0] for j in held} <= set(ids) and held[0] != held[1]
        assert w["gpus"] == ["nvidia0", "nvidia1"]
        r = subprocess.run([sys.executable, "-m", "sandmill", "workers", "--url", c.base], cwd=REPO,
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "SANDMILL_TOKEN": TOKEN, "COLUMNS": "400"})
        assert r.returncode == 0, r.stderr
        assert f"GPU 0: job {held[0][0]}" in r.stdout or f"GPU 1: job {held[1][0]}" in r.stdout, r.stdout
        jobs = [wait_done(api, ws, j, timeout=60) for j in ids]
    for j in jobs:
        assert j["success"], j
        res, gpu = j["result"], j["gpu"]
        assert gpu == j["outcome"]["gpu"] and len(gpu["indexes"]) == 1
        n = gpu["indexes"][0]
        # exactly its own node, the env renumbered inside, the host index outside
        assert res["nodes"] == ["/dev/nvidia-uvm", f"/dev/nvidia{n}", "/dev/nvidiactl"], res
        assert res["cvd"] == "0" and res["nvd"] == str(n)
        assert gpu["held_ms"] >= 3500 and gpu["shared"] is False
        assert gpu["peak_memory_bytes"] is None and gpu["busy_ms"] is None  # no NVML here
        assert gpu["measured"].startswith("not measured")
    jobs.sort(key=lambda j: j["result"]["t0"])
    first, second, third = jobs
    assert {first["gpu"]["indexes"][0], second["gpu"]["indexes"][0]} == {0, 1}  # concurrent: different GPUs
    assert second["result"]["t0"] < first["result"]["t1"]  # they did run at once
    # the third waited for a GPU: it started after one of the others ended, never beside both
    assert third["result"]["t0"] >= min(first["result"]["t1"], second["result"]["t1"]) - 0.5
    assert third["gpu"]["wait_ms"] >= 2000, third["gpu"]


def test_worker_refuses_more_gpus_per_job_than_it_has(make_cluster, gpu_dev, tmp_path):
    c = make_cluster()
    prof = tmp_path / "gpu2.yaml"
    prof.write_text(PROFILE.format(name="gpu-many", tag="gpu-many").replace("gpus_per_job: 1", "gpus_per_job: 3"))
    r = subprocess.run([sys.executable, "-m", "sandmill", "worker", "--profile", str(prof)], cwd=REPO,
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "DATABASE_URL": c.db_url, "SANDMILL_GPU_DEV_DIR": str(gpu_dev)})
    assert r.returncode == 2, r.stderr
    assert "gpus_per_job is 3 but this worker has 2 GPU(s)" in r.stderr


DEPS_JOB = """# requirements:
# six
import glob, os, six
def main():
    return {"nodes": sorted(glob.glob("/dev/nvidia*")), "six": six.__file__,
            "cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}
"""


def test_job_with_requirements_gets_its_gpu(make_cluster, ws, gpu_dev, tmp_path):
    """A python3 job with dependencies in a GPU group runs on its GPU, with its environment."""
    c = make_cluster()
    group, tag = f"gpud-{uuid.uuid4().hex[:6]}", f"gpud-{uuid.uuid4().hex[:6]}"
    prof = tmp_path / "gpu.yaml"
    prof.write_text(PROFILE.format(name=group, tag=tag))
    c.spawn("worker", "--profile", str(prof), env={"SANDMILL_GPU_DEV_DIR": str(gpu_dev)})
    c.wait_workers(group)
    with c.client() as api:
        r = api.post(f"/api/w/{ws}/jobs/run/preview", params={"tag": tag},
                     json={"content": DEPS_JOB, "language": "python3", "args": {}})
        assert r.status_code == 201, r.text
        j = wait_done(api, ws, r.text, timeout=120)
    assert j["success"], j
    n = j["gpu"]["indexes"][0]
    assert j["result"]["nodes"] == ["/dev/nvidia-uvm", f"/dev/nvidia{n}", "/dev/nvidiactl"], j["result"]
    assert j["result"]["cvd"] == "0" and "/usr/lib/python3" not in j["result"]["six"]
