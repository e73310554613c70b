"""The app factory: the FastAPI app bound to one database. Job endpoints follow Windmill's
REST paths, field names and shapes, so a Windmill client can drive sandmill unchanged."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
from asyncpg.exceptions import InternalClientError
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sandmill.store import db as dbmod

from .autoscale.loop import Autoscaler
from .monitor import monitor_loop
from .routes import agent, jobs, meta, scripts, users, workers
from .routes import dashboard, dashboard_api
from .routes import autoscaling as autoscaling_routes
from . import fast_submit, submit_batch
from .settings import ServerSettings
from .waiters import ResultWaiters, listen_for_results

log = logging.getLogger("sandmill.api")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """Migrate, open the pool, listen for completions (result waiters), run the monitor."""
    settings: ServerSettings = app.state.settings
    await dbmod.migrate_url(settings.database_url)
    app.state.pool = pool = await dbmod.create_pool(settings.database_url, min_size=2, max_size=10)
    submit_batch.attach(pool)  # concurrent submits share an INSERT
    listening = asyncio.Event()  # before the first request: a waiter's NOTIFY is not missed
    listener = asyncio.create_task(listen_for_results(settings.database_url, pool, app.state.waiters,
                                                      listening))
    await asyncio.wait([listener, asyncio.create_task(listening.wait())], return_when=asyncio.FIRST_COMPLETED)
    mon = asyncio.create_task(monitor_loop(pool, settings.ping_timeout_s, settings.max_restarts,
                                           settings.monitor_every_s))
    scaler = Autoscaler(settings.database_url, pool)  # acts in one server at a time (a lock)
    scaling = asyncio.create_task(scaler.run())
    try:
        yield
    finally:
        scaling.cancel()
        await asyncio.gather(scaling, return_exceptions=True)
        await scaler.close()
        mon.cancel()
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        submit_batch.detach(pool)
        await pool.close()


async def _validation(_req: Request, exc: RequestValidationError) -> JSONResponse:
    errs = [{"field": ".".join(str(x) for x in e["loc"] if x != "body") or "body", "reason": e["msg"]}
            for e in exc.errors()]
    msg = "; ".join(f"{e['field']}: {e['reason']}" for e in errs)
    return JSONResponse({"error": f"invalid request: {msg}", "detail": errs}, status_code=422)


async def _http(_req: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _db(_req: Request, exc: Exception) -> JSONResponse:
    """A database fault as a JSON answer: 503 (try again) while the database is down or
    unreachable, or for any statement it failed; 400 when it refused a value of the
    request (PostgreSQL's class 22, data exceptions, or one asyncpg cannot send)."""
    if isinstance(exc, ValueError) or (  # asyncpg's own DataError: a value it cannot send
            isinstance(exc, asyncpg.PostgresError) and (exc.sqlstate or "").startswith("22")):
        log.warning("database refused a value: %s", exc)
        return JSONResponse({"error": f"invalid value: {exc}"}, status_code=400)
    if dbmod.is_disconnect(exc):
        log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
        return JSONResponse({"error": f"database unavailable ({type(exc).__name__}): try again shortly"},
                            status_code=503, headers={"Retry-After": "1"})
    log.error("database error: %s: %s", type(exc).__name__, exc)
    return JSONResponse({"error": f"database error: {type(exc).__name__}"}, status_code=503)


def create_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI app, bound to one database."""
    app = FastAPI(title="sandmill", version="0.1.0", lifespan=lifespan,
                  description="Sandboxed job execution runtime. Job endpoints are Windmill-compatible.")
    app.state.settings = settings
    app.state.waiters = ResultWaiters()
    app.add_exception_handler(RequestValidationError, _validation)
    # Starlette's own (unknown path, method not allowed) too: every 4xx is {"error": ...}
    app.add_exception_handler(StarletteHTTPException, _http)
    # database faults (an outage: refused, lost or closed connections, a server starting
    # or shutting down, a failed pool acquire) answer 503 with a message, never a 500
    # (and asyncpg's InternalClientError: a pooled connection left mid-operation by a cut)
    for exc in (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, InternalClientError):
        app.add_exception_handler(exc, _db)
    for r in (meta.router, scripts.router, jobs.router, workers.router, users.router, agent.router):
        app.include_router(r)
    app.include_router(autoscaling_routes.router)
    app.include_router(dashboard.router), app.include_router(dashboard_api.router)  # the web dashboard at /
    fast_submit.install(app)  # POST .../jobs/run/preview without FastAPI's per-request machinery
    return app
