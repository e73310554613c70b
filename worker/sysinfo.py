"""What this host is and has, as a worker advertises it."""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
from importlib import metadata

import psutil


def detect_gpus() -> list[str]:
    """GPUs found through the NVIDIA device files or nvidia-smi (names when it can say)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=5).stdout
            names = [line.split(":", 1)[1].split("(")[0].strip() for line in out.splitlines() if line.startswith("GPU ")]
            if names:
                return names
        except (OSError, subprocess.SubprocessError):
            pass
    return [f"nvidia{m.group(1)}" for d in sorted(glob.glob("/dev/nvidia*"))
            if (m := re.fullmatch(r"/dev/nvidia(\d+)", d))]


def version() -> str:
    try:
        return metadata.version("sandmill")
    except metadata.PackageNotFoundError:
        return "dev"


def host_info() -> dict:
    return {
        "hostname": socket.gethostname(),
        "cpus": os.cpu_count() or 1,
        "memory_mb": psutil.virtual_memory().total // (1024 * 1024),
        "gpus": detect_gpus(),
        "version": version(),
    }
