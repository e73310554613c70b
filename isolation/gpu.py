"""The host's NVIDIA GPUs, and what passing some of them into a sandbox takes.

``discover()`` finds the GPU device nodes (``/dev/nvidia<N>``), the control nodes every
CUDA process needs (``/dev/nvidiactl``, ``/dev/nvidia-uvm``, ``/dev/nvidia-uvm-tools``),
the driver's user-space libraries (``ldconfig -p``: ``libcuda*``, ``libnvidia-*``...) and
``nvidia-smi``. ``GpuHost.grant(indexes)`` is the ``GpuGrant`` a backend passes through
for one job: its own GPU nodes and the control nodes read/write, the rest read-only.

Every path is overridable, so that CI without a GPU checks the plumbing with stand-in
nodes (character devices made like /dev/null): ``dev_dir`` (or SANDMILL_GPU_DEV_DIR)
is where the nodes are looked for; inside the sandbox they are always ``/dev/<name>``.
The GPU index is the N of the node's name, which is the driver's minor number and
nvidia-smi's index on the host.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass, field

from .spec import GpuGrant, Mount

CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")
# What a CUDA process loads from the driver (what the NVIDIA container toolkit passes
# for the compute and utility capabilities); the CUDA runtime itself is the job's own.
LIBRARY_PREFIXES = ("libcuda.", "libcudadebugger.", "libnvidia-ml.", "libnvidia-ptxjitcompiler.",
                    "libnvidia-nvvm.", "libnvidia-cfg.", "libnvidia-opencl.", "libnvidia-gpucomp.",
                    "libnvidia-allocator.", "libnvidia-pkcs11")
BINARIES = ("nvidia-smi",)
_NODE = re.compile(r"^nvidia(\d+)$")
_LDCONFIG_LINE = re.compile(r"^\s*(\S+) \(([^)]*)\) => (/\S+)$")


@dataclass(frozen=True)
class GpuDevice:
    """One GPU: ``index`` (N of /dev/nvidia<N>), its node's host path, and what
    nvidia-smi says of it (empty when it cannot)."""

    index: int
    path: str
    name: str = ""
    uuid: str = ""


@dataclass(frozen=True)
class GpuHost:
    """What this host offers for GPU jobs."""

    devices: tuple[GpuDevice, ...] = ()
    control: tuple[str, ...] = ()     # host paths of the control nodes found
    libraries: tuple[str, ...] = ()   # host paths of the driver libraries
    binaries: tuple[str, ...] = ()    # host paths of nvidia-smi
    notes: tuple[str, ...] = field(default_factory=tuple)  # what is missing, in words

    @property
    def indexes(self) -> list[int]:
        return [d.index for d in self.devices]

    def device(self, index: int) -> GpuDevice:
        for d in self.devices:
            if d.index == index:
                return d
        raise KeyError(f"no GPU {index} on this host (found {self.indexes})")

    def grant(self, indexes: list[int] | tuple[int, ...]) -> GpuGrant:
        """What one job gets for the GPUs ``indexes``: exactly those nodes, the control
        nodes (read/write) and the driver files (read-only)."""
        nodes = [self.device(i).path for i in indexes] + list(self.control)
        return GpuGrant(
            indexes=tuple(indexes),
            devices=tuple(Mount(p, "/dev/" + os.path.basename(p), writable=True) for p in nodes),
            files=tuple(Mount(p, p) for p in (*self.libraries, *self.binaries)),
        )


def is_char_device(path: str) -> bool:
    try:
        return stat.S_ISCHR(os.stat(path).st_mode)
    except OSError:
        return False


def device_nodes(dev_dir: str) -> tuple[list[tuple[int, str]], list[str]]:
    """The GPU nodes (index, path) by index, and the control nodes, under ``dev_dir``."""
    try:
        names = os.listdir(dev_dir)
    except OSError:
        return [], []
    gpus = sorted((int(m.group(1)), os.path.join(dev_dir, n)) for n in names
                  if (m := _NODE.match(n)) and is_char_device(os.path.join(dev_dir, n)))
    control = [os.path.join(dev_dir, n) for n in CONTROL_NODES if is_char_device(os.path.join(dev_dir, n))]
    return gpus, control


def driver_libraries(ldconfig_output: str | None = None) -> list[str]:
    """The driver's libraries in the loader's cache (``ldconfig -p``), existing paths only."""
    if ldconfig_output is None:
        ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
        try:
            ldconfig_output = subprocess.run([ldconfig, "-p"], capture_output=True, text=True,
                                             timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
    found: list[str] = []
    for line in ldconfig_output.splitlines():
        m = _LDCONFIG_LINE.match(line)
        if m and m.group(1).startswith(LIBRARY_PREFIXES) and os.path.exists(m.group(3)) \
                and m.group(3) not in found:
            found.append(m.group(3))
    return found


def smi_names(smi: str | None) -> dict[int, tuple[str, str]]:
    """index -> (name, uuid) from nvidia-smi; empty when it is absent or fails."""
    if smi is None:
        return {}
    try:
        out = subprocess.run([smi, "--query-gpu=index,name,uuid", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    names: dict[int, tuple[str, str]] = {}
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            names[int(parts[0])] = (parts[1], parts[2])
    return names


def discover(dev_dir: str | None = None, only: list[int] | None = None,
             ldconfig_output: str | None = None) -> GpuHost:
    """This host's GPUs under ``dev_dir`` (default SANDMILL_GPU_DEV_DIR, else /dev),
    restricted to the indexes ``only`` (default SANDMILL_GPUS, comma-separated, else all)."""
    dev_dir = dev_dir or os.environ.get("SANDMILL_GPU_DEV_DIR") or "/dev"
    if only is None:
        only = parse_indexes(os.environ.get("SANDMILL_GPUS", ""))
    gpus, control = device_nodes(dev_dir)
    notes: list[str] = []
    if only is not None:
        missing = sorted(set(only) - {i for i, _ in gpus})
        if missing:
            notes.append(f"SANDMILL_GPUS names GPU(s) {missing} with no {dev_dir}/nvidia<N> node")
        gpus = [(i, p) for i, p in gpus if i in only]
    smi = shutil.which("nvidia-smi")
    names = smi_names(smi) if gpus and dev_dir == "/dev" else {}
    libs = driver_libraries(ldconfig_output) if gpus else []
    if gpus and os.path.join(dev_dir, "nvidiactl") not in control:
        notes.append(f"no {dev_dir}/nvidiactl: CUDA cannot start without it")
    if gpus and not libs:
        notes.append("no driver library (libcuda) in the loader's cache (ldconfig -p)")
    return GpuHost(
        devices=tuple(GpuDevice(i, p, *names.get(i, ("", ""))) for i, p in gpus),
        control=tuple(control), libraries=tuple(libs),
        binaries=tuple(b for b in (smi,) if b and gpus), notes=tuple(notes))


def parse_indexes(text: str) -> list[int] | None:
    """``"0,2"`` -> [0, 2]; empty -> None (no restriction). Raises ValueError on junk."""
    text = text.strip()
    if not text:
        return None
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"SANDMILL_GPUS must be GPU indexes separated by commas, got {text!r}") from None


def job_env(grant: GpuGrant) -> dict[str, str]:
    """The job's GPU variables. Inside the sandbox the job sees only its own nodes, so
    CUDA numbers its GPUs from 0: CUDA_VISIBLE_DEVICES is 0..k-1. NVIDIA_VISIBLE_DEVICES
    keeps the host indexes (what the NVIDIA container toolkit reads it as)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(len(grant.indexes))),
            "NVIDIA_VISIBLE_DEVICES": ",".join(str(i) for i in grant.indexes)}
