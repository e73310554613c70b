"""The app factory: the FastAPI app bound to one database. Job endpoints follow Windmill's
REST paths, field names and shapes, so a Windmill client can drive sandmill unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from sandmill.store import db as dbmod
from sandmill.store import queue

from .monitor import monitor_loop
from .routes import jobs, meta, scripts, users, workers
from .settings import ServerSettings
from .waiters import ResultWaiters

log = logging.getLogger("sandmill.api")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """Migrate, open the pool, listen for completions (result waiters), run the monitor."""
    settings: ServerSettings = app.state.settings
    conn = await dbmod.connect(settings.database_url)
    try:
        await dbmod.migrate(conn)
    finally:
        await conn.close()
    app.state.pool = pool = await dbmod.create_pool(settings.database_url, min_size=2, max_size=10)
    listener = await dbmod.connect(settings.database_url)
    await listener.add_listener(queue.CH_DONE, app.state.waiters.on_done)
    mon = asyncio.create_task(monitor_loop(pool, settings.ping_timeout_s, settings.max_restarts,
                                           settings.monitor_every_s))
    try:
        yield
    finally:
        mon.cancel()
        await listener.close()
        await pool.close()


async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
    errs = [{"field": ".".join(str(x) for x in e["loc"] if x != "body") or "body", "reason": e["msg"]}
            for e in exc.errors()]
    msg = "; ".join(f"{e['field']}: {e['reason']}" for e in errs)
    return JSONResponse({"error": f"invalid request: {msg}", "detail": errs}, status_code=422)


async def _http(_req: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _pg(_req: Request, exc: asyncpg.PostgresError) -> JSONResponse:
    log.error("database error: %s", exc)
    return JSONResponse({"error": f"database unavailable: {type(exc).__name__}"}, status_code=503)


def create_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI app, bound to one database."""
    app = FastAPI(title="sandmill", version="0.1.0", lifespan=lifespan,
                  description="Sandboxed job execution runtime. Job endpoints are Windmill-compatible.")
    app.state.settings = settings
    app.state.waiters = ResultWaiters()
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(asyncpg.PostgresError, _pg)
    for r in (meta.router, scripts.router, jobs.router, workers.router, users.router):
        app.include_router(r)
    return app
