"""`GET /realtime`: a page with a microphone button that shows the words as they are spoken.

The page holds no data, so its shell is open (`auth.py`); it speaks `/v1/realtime` over a
WebSocket and passes a key from the page's `?api_key=` on to it (a browser cannot set headers
on a WebSocket). The file ships in the wheel as package data.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@functools.lru_cache(maxsize=1)
def page() -> str:
    return resources.files("serve_app").joinpath("static/realtime.html").read_text(encoding="utf-8")


@router.get("/realtime", response_class=HTMLResponse, include_in_schema=False)
async def realtime_page() -> HTMLResponse:
    return HTMLResponse(page(), headers={"Cache-Control": "no-cache"})
