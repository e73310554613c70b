"""The container a Docker job runs in: the host config (mounts, limits, hardening) as
``create_host_config`` takes it."""

from __future__ import annotations

import math
from typing import Any

from docker.types import DeviceRequest, LogConfig, Ulimit
from docker.types import Mount as DockerMount

from .spec import RunSpec

WORKDIR = "/work"
MIB = 1024 * 1024


def host_config(spec: RunSpec, workdir: str, log_driver: str, log_max_size: str,
                gpu_mode: str = "devices") -> dict[str, Any]:
    """Keyword arguments of ``create_host_config`` for one job: ``workdir`` bound rw at
    /work, the spec's mounts (read-only unless writable), tmpfs /tmp, read-only root, no network (unless host), no capabilities,
    no-new-privileges, docker-init, the job's limits (CPU quota, memory = memory+swap,
    pids, rlimits), and the job's GPUs (``gpu_host_config``)."""
    lim = spec.limits
    ulimits = [Ulimit(name="core", soft=0, hard=0)]  # no core files from SIGXCPU/XFSZ
    if lim.cpu_s is not None:
        # Soft: SIGXCPU (cpu_limit); hard one second later: SIGKILL if it is ignored.
        soft = max(1, math.ceil(lim.cpu_s))
        ulimits.append(Ulimit(name="cpu", soft=soft, hard=soft + 1))
    if lim.file_size_mb is not None:
        ulimits.append(Ulimit(name="fsize", soft=lim.file_size_mb * MIB, hard=lim.file_size_mb * MIB))
    if lim.open_files is not None:
        ulimits.append(Ulimit(name="nofile", soft=lim.open_files, hard=lim.open_files))
    tmp_opts = "rw,nosuid,nodev,mode=1777"
    if lim.tmp_mb is not None:
        tmp_opts += f",size={lim.tmp_mb}m"
    host: dict[str, Any] = dict(
        binds={workdir: {"bind": WORKDIR, "mode": "rw"}},
        # The mount API, not "src:dst:mode" strings: a path may hold a colon.
        mounts=[DockerMount(m.target, m.source, type="bind", read_only=not m.writable)
                for m in spec.mounts],
        network_mode="host" if spec.network == "host" else "none",
        read_only=True,
        tmpfs={"/tmp": tmp_opts},
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        init=True,
        log_config=log_config(log_driver, log_max_size),
        ulimits=ulimits,
    )
    if spec.gpu is not None:
        for k, v in gpu_host_config(spec, gpu_mode).items():
            host[k] = host.get(k, []) + v
    if lim.pids is not None:
        host["pids_limit"] = lim.pids + 1  # + docker-init, which is not the job's
    if lim.cpu_cores is not None:
        host["nano_cpus"] = int(lim.cpu_cores * 1e9)  # a CFS quota: one job cannot starve the rest
    if lim.memory_mb is not None:
        host["mem_limit"] = lim.memory_mb * MIB
        host["memswap_limit"] = lim.memory_mb * MIB  # no swap: memory+swap = memory
    return host


def log_config(driver: str, max_size: str) -> LogConfig:
    """Docker's own log of the job: off by default; json-file/local capped at one file."""
    if driver in ("json-file", "local"):
        return LogConfig(type=driver, config={"max-size": max_size, "max-file": "1"})
    return LogConfig(type=driver)


def gpu_mode(info: dict[str, Any]) -> str:
    """How this dockerd passes GPUs, from ``docker info``: ``nvidia`` (device requests,
    done by the NVIDIA container toolkit) where the nvidia runtime is registered, else
    ``devices`` (the device nodes and the driver files ourselves)."""
    return "nvidia" if "nvidia" in (info.get("Runtimes") or {}) else "devices"


GPU_MODE_WORDS = {"nvidia": "GPUs as device requests (the nvidia runtime is registered)",
                  "devices": "GPUs as device nodes and driver-library binds (no nvidia runtime in docker info)"}


def gpu_host_config(spec: RunSpec, mode: str) -> dict[str, list[Any]]:
    """The host config entries that pass ``spec.gpu`` through, added to the job's: a
    device request for exactly its GPUs (``nvidia``), or its nodes with a cgroup rule
    each (docker's ``devices``) and the driver files bound read-only (``devices``)."""
    g = spec.gpu
    assert g is not None
    if mode == "nvidia":
        return {"device_requests": [DeviceRequest(driver="nvidia", device_ids=[str(i) for i in g.indexes],
                                                  capabilities=[["gpu", "compute", "utility"]])]}
    return {"devices": [f"{m.source}:{m.target}:rwm" for m in g.devices],
            "mounts": [DockerMount(m.target, m.source, type="bind", read_only=True) for m in g.files]}
