"""Structured, quiet-by-default logging for the service's own loggers."""

from __future__ import annotations

import json
import logging
import time

from serve_app.config import Settings

_configured = False


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload)


def serve_logging_config(settings: Settings | None = None) -> dict[str, object]:
    """Ray Serve's own logs (controller, proxy, replicas): JSON, at our level, access log off
    unless asked for, so a healthy service is quiet."""
    settings = settings or Settings()
    return {
        "encoding": "JSON" if settings.log_json else "TEXT",
        "log_level": settings.log_level.upper(),
        "enable_access_log": settings.access_log,
    }


def configure_logging(settings: Settings | None = None) -> None:
    """Attach one handler to the `serve_app` logger tree; idempotent per process."""
    global _configured
    if _configured:
        return
    settings = settings or Settings()
    logger = logging.getLogger("serve_app")
    logger.setLevel(settings.log_level.upper())
    handler = logging.StreamHandler()
    plain = logging.Formatter("%(levelname)s %(name)s: %(message)s")
    handler.setFormatter(JsonFormatter() if settings.log_json else plain)
    logger.addHandler(handler)
    logger.propagate = False
    _configured = True
