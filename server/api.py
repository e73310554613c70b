"""Temporary re-export until sandmill/cli.py imports sandmill.server.app; the routes live in server/routes/."""
from .app import create_app  # noqa: F401
from .views import _job_json  # noqa: F401
