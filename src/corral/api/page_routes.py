"""The web page at ``/``: three static files shipped in the package (no CDN, no build step).

The files need no token (the security middleware lets ``/`` and ``/static/<name>`` through);
every call the page makes for data goes to ``/v1/*`` with the token the user entered.
Only the files listed in :data:`FILES` are served, read once from the package.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

# Everything from this origin only; no inline script or style, no framing, no plugins.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


@functools.cache
def _read(name: str) -> bytes:
    return (resources.files("corral.api") / "static" / name).read_bytes()


def _file(name: str) -> Response:
    media_type = FILES.get(name)
    if media_type is None:
        raise HTTPException(404, f"no static file {name!r}")
    return Response(_read(name), media_type=media_type, headers=HEADERS)


def page_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.api_route("/", methods=["GET", "HEAD"])
    async def page() -> Response:
        """The page (needs no token; it asks for one when the API does)."""
        return _file("index.html")

    @router.api_route("/static/{name}", methods=["GET", "HEAD"])
    async def static(name: str) -> Response:
        return _file(name)

    return router
