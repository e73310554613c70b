"""What a job did with its GPUs: peak GPU memory and busy time, read through NVML
(``nvidia-ml-py``, imported as ``pynvml``; an optional dependency: ``pip install
'sandmill[gpu]'``).

A ``GpuMeter`` samples the job's GPUs from a thread while the job runs: the device memory
in use (its peak above the level found at the start is the job's peak) and the
utilisation (each sample's percentage times the time since the last one, summed, is the
busy time). Per device, not per process: with ``gpu_sharing`` the figures include the
other jobs on the same GPU (the outcome says ``shared``). Where NVML cannot be read (no
``pynvml``, no driver) the figures are None and ``measured`` says why.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

INTERVAL_S = 0.2

# A reader gives, for one GPU, (memory used in bytes, utilisation percent).
Reader = Callable[[], tuple[int, int]]

_nvml_lock = threading.Lock()
_nvml_state: dict[str, Any] = {}  # "error": why NVML cannot be read; "handles": minor -> handle


def nvml_readers(indexes: list[int] | tuple[int, ...]) -> tuple[list[Reader] | None, str]:
    """A reader per GPU index (the N of /dev/nvidia<N>, NVML's minor number), or None and
    the reason NVML cannot be read here. NVML is started once per process."""
    with _nvml_lock:
        if not _nvml_state:
            _nvml_state.update(_start_nvml())
    if "error" in _nvml_state:
        return None, _nvml_state["error"]
    handles = _nvml_state["handles"]
    missing = [i for i in indexes if i not in handles]
    if missing:
        return None, f"not measured: NVML knows no GPU with minor number {missing}"
    import pynvml  # type: ignore[import-not-found]

    def reader(h: Any) -> Reader:
        return lambda: (int(pynvml.nvmlDeviceGetMemoryInfo(h).used),
                        int(pynvml.nvmlDeviceGetUtilizationRates(h).gpu))
    return [reader(handles[i]) for i in indexes], "nvml"


def _start_nvml() -> dict[str, Any]:
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        return {"error": "not measured: nvidia-ml-py is not installed (pip install 'sandmill[gpu]')"}
    try:
        pynvml.nvmlInit()
        handles = {}
        for n in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(n)
            handles[int(pynvml.nvmlDeviceGetMinorNumber(h))] = h
        return {"handles": handles}
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded...
        return {"error": f"not measured: NVML: {e}"}


class GpuMeter:
    """Samples ``readers`` (one per GPU of the job) every ``interval_s`` in a thread,
    from ``start()`` to ``stop()``."""

    def __init__(self, readers: list[Reader] | None, why: str = "nvml", interval_s: float = INTERVAL_S):
        self.readers = readers or []
        self.why = why if readers else (why or "not measured")
        self.interval_s = interval_s
        self.base: list[int] = []
        self.peak: list[int] = []
        self.busy_s = 0.0
        self._last = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        if not self.readers:
            return
        try:
            first = [r() for r in self.readers]
        except Exception as e:  # noqa: BLE001 - a GPU that cannot be read costs the job nothing
            self.readers, self.why = [], f"not measured: NVML: {e}"
            return
        self.base = [m for m, _ in first]
        self.peak = list(self.base)
        self._last = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name="sandmill-gpu-meter", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        """One reading of every GPU (the thread's, and one more at the stop)."""
        try:
            now_ = [r() for r in self.readers]
        except Exception:  # noqa: BLE001 - keep what was read so far
            return
        with self._lock:
            t = time.monotonic()
            dt, self._last = t - self._last, t
            for k, (mem, util) in enumerate(now_):
                self.peak[k] = max(self.peak[k], mem)
                self.busy_s += dt * min(max(util, 0), 100) / 100.0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def stop(self, join_s: float = 1.0) -> dict[str, Any]:
        """End the sampling; the figures: ``peak_memory_bytes`` (summed over the job's
        GPUs, above their level at the start), ``busy_ms`` and ``measured``."""
        if self._thread is None:
            return {"peak_memory_bytes": None, "busy_ms": None, "measured": self.why}
        self._stop.set()
        self._thread.join(join_s)
        self.sample()
        with self._lock:
            peak = sum(max(0, p - b) for p, b in zip(self.peak, self.base))
            return {"peak_memory_bytes": peak, "busy_ms": int(self.busy_s * 1000), "measured": self.why}
