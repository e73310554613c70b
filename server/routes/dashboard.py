"""The web dashboard, served at ``/``: one page (index.html) and its script and style,
shipped as package data of ``sandmill.server.dashboard``. It signs in with a token (kept
in the tab's sessionStorage) and reads the JSON API."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)

ASSETS = {"app.js": "text/javascript; charset=utf-8", "pages.js": "text/javascript; charset=utf-8",
          "util.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
# Only our own files run; the page builds its DOM with textContent (job output is hostile).
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none';"
                                      " base-uri 'none'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}


@lru_cache(maxsize=None)
def asset(name: str) -> bytes:
    return resources.files("sandmill.server.dashboard").joinpath(name).read_bytes()


@router.get("/")
async def index() -> Response:
    """The dashboard's page."""
    return Response(asset("index.html"), media_type="text/html; charset=utf-8", headers=HEADERS)


@router.get("/dashboard/{name}")
async def static(name: str) -> Response:
    """The page's script and style (only those)."""
    if name not in ASSETS:
        raise HTTPException(404, f"no dashboard file {name!r}")
    return Response(asset(name), media_type=ASSETS[name], headers=HEADERS)
