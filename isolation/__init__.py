"""Run one command in a sandbox and get an Outcome. No DB, no HTTP."""

from .base import Backend, OutputCallback, Probe
from .registry import BACKENDS, get_backend
from .spec import Limits, Mount, Network, Outcome, RunSpec, Status

__all__ = [
    "BACKENDS", "Backend", "Limits", "Mount", "Network", "Outcome", "OutputCallback", "Probe",
    "RunSpec", "Status", "get_backend",
]
