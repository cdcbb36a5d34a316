"""Every failure reaches the client in OpenAI's error shape with the right status and headers."""

from __future__ import annotations

import json
import pickle

import pytest

from serve_app.api.errors import error_response, unwrap
from serve_app.errors import (
    CapacityError,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    RouterUnavailable,
)


def body(resp) -> dict:  # type: ignore[no-untyped-def]
    return json.loads(resp.body)["error"]


@pytest.mark.parametrize(
    ("exc", "status", "retry_after"),
    [
        (InvalidRequest("bad", param="input"), 400, None),
        (PayloadTooLarge("too big", param="file"), 413, None),
        (ModelNotFound("x", ["a", "b"]), 404, None),
        (CapacityError("no room", retry_after_s=7), 503, "7"),
        (QueueFull("full", retry_after_s=0.2), 503, "1"),
        (ModelLoadError("m", "load", RuntimeError("disk")), 503, None),
        (RouterUnavailable("restarting"), 503, "2"),
        (RuntimeError("boom"), 500, None),
    ],
)
def test_status_shape_and_retry_after(exc: Exception, status: int, retry_after: str | None) -> None:
    resp = error_response(exc)
    assert resp.status_code == status
    err = body(resp)
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert resp.headers.get("retry-after") == retry_after


def test_not_found_lists_available_models() -> None:
    err = body(error_response(ModelNotFound("x", ["b", "a"])))
    assert "a, b" in err["message"] and err["param"] == "model" and err["code"] == "model_not_found"


def test_errors_survive_pickling_across_processes() -> None:
    """Replica errors reach the ingress pickled (Ray); status, param and Retry-After must survive."""
    for exc in (InvalidRequest("bad", param="input"), CapacityError("no room", retry_after_s=9)):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and again.body() == exc.body() and again.headers() == exc.headers()


def test_wrapped_errors_are_unwrapped() -> None:
    class TaskError(Exception):
        def __init__(self, cause: BaseException) -> None:
            super().__init__("wrapped")
            self.cause = cause

    inner = CapacityError("no room", retry_after_s=3)
    assert unwrap(TaskError(inner)) is inner
    assert error_response(TaskError(inner)).status_code == 503


def test_serve_back_pressure_is_a_503() -> None:
    from ray.serve.exceptions import BackPressureError

    resp = error_response(BackPressureError(num_queued_requests=10, max_queued_requests=10))
    assert resp.status_code == 503 and resp.headers["retry-after"] and body(resp)["code"] == "queue_full"


def test_a_replica_lost_mid_request_is_a_retryable_503() -> None:
    class ActorDiedError(Exception):  # Ray's class, matched by name (the api layer imports no Ray)
        pass

    r = error_response(ActorDiedError("The actor died unexpectedly before finishing this task.\nmore"))
    body = json.loads(r.body)
    assert r.status_code == 503 and r.headers["retry-after"] == "2"
    assert body["error"]["code"] == "replica_unavailable" and "ActorDiedError" in body["error"]["message"]
