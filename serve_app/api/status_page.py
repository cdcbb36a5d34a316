"""`GET /`: the live status page, one self-contained HTML file (no CDN: it works offline).

The shell holds no data, so it needs no key; the page reads `/gpu/status` and `/gpu/events`
and sends commands with the key the operator types in (kept in the browser's localStorage).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@lru_cache(maxsize=1)
def page() -> str:
    return resources.files("serve_app").joinpath("static/status.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def status_page() -> HTMLResponse:
    return HTMLResponse(page(), headers={"Cache-Control": "no-cache"})
