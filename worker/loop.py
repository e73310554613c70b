"""Temporary: sandmill/cli.py's old import path; the coordinator removes this file once cli.py imports sandmill.worker.main.run_worker and sandmill.worker.settings.WorkerSettings."""
from .main import run_worker  # noqa: F401
from .settings import WorkerSettings  # noqa: F401
from .worker import Worker  # noqa: F401
