"""sandmill: a sandboxed job execution runtime. The packages: ``sandmill.isolation`` (run
one command in a sandbox), ``sandmill.profiles`` (worker group profiles), ``sandmill.store``
(PostgreSQL: connection, migrations, all SQL), ``sandmill.worker`` (the worker process),
``sandmill.server`` (the HTTP API and the monitor); ``sandmill.cli`` ties them together."""

__version__ = "0.1.0"
