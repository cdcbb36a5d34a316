"""User errors raised by a replica method log one WARNING line, not Serve's traceback."""

from __future__ import annotations

import io
import logging

from serve_app.errors import CapacityError, InvalidRequest
from serve_app.logs import UserErrorFilter, quiet_user_errors


def _log_failure(exc: BaseException) -> str:
    """Log as Serve's replica does (`logger.exception("Request failed.")` on `ray.serve`)."""
    stream = io.StringIO()
    logger = logging.getLogger("ray.serve.test-user-errors")
    logger.addFilter(UserErrorFilter())
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise exc
        except Exception:
            logger.exception("Request failed.")
    finally:
        logger.removeHandler(handler)
        logger.filters.clear()
    return stream.getvalue()


def test_a_user_error_is_one_warning_line() -> None:
    out = _log_failure(InvalidRequest("could not decode the audio file", param="file", code="invalid_audio"))
    assert out.count("\n") == 1, out
    assert out.startswith("WARNING Request failed. 400 invalid_audio: could not decode the audio file")
    assert "Traceback" not in out


def test_a_server_error_keeps_its_traceback() -> None:
    for exc in (CapacityError("no room"), RuntimeError("boom")):
        out = _log_failure(exc)
        assert out.startswith("ERROR Request failed.") and "Traceback" in out, out


def test_installed_once_on_serves_logger() -> None:
    quiet_user_errors()
    quiet_user_errors()
    filters = [f for f in logging.getLogger("ray.serve").filters if isinstance(f, UserErrorFilter)]
    assert len(filters) == 1
