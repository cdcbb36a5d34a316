"""Structured, quiet-by-default logging for the service's own loggers."""

from __future__ import annotations

import json
import logging
import time

from serve_app.config import Settings
from serve_app.errors import ServeError

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


class UserErrorFilter(logging.Filter):
    """Turn Serve's "Request failed." traceback for a user error (a 4xx ServeError raised by a
    replica method, e.g. undecodable audio) into one WARNING line: the client already got the
    message, and a traceback per bad upload buries the real failures."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ServeError) and exc.status_code < 500:
            record.msg, record.args = "%s %d %s: %s", (record.getMessage(), exc.status_code, exc.code, exc.message)
            record.exc_info = record.exc_text = record.stack_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def quiet_user_errors() -> None:
    """Install `UserErrorFilter` on Serve's logger in this process (idempotent)."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, UserErrorFilter) for f in serve_logger.filters):
        serve_logger.addFilter(UserErrorFilter())


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
    quiet_user_errors()
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
