"""Errors the service raises, and how each maps onto an OpenAI-shaped HTTP error.

    ServeError                    (500 internal_error)
    ├── InvalidRequest            (400 invalid_request_error; param names the field)
    │   └── PayloadTooLarge       (413)
    ├── ModelNotFound             (404; the message lists the served ids)
    ├── CapacityError             (503 + Retry-After: no GPU room within the request timeout)
    │   ├── QueueFull             (503 + Retry-After: too many requests waiting on an instance)
    │   └── SessionLimit          (a realtime session over a replica's limit: error event, close 1013)
    ├── ModelLoadError            (503: the load or restore failed; the next request tries again)
    ├── ModelUnschedulable        (503 + Retry-After: no node can host a replica of the model)
    ├── ReplicaUnavailable        (503 + Retry-After: the replica died mid-request; Serve replaces it)
    └── RouterUnavailable         (503 + Retry-After: the router actor is restarting)

Every message says what happened and what to do next.
"""

from __future__ import annotations

from typing import Any


class ServeError(Exception):
    status_code = 500
    error_type = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def headers(self) -> dict[str, str]:
        return {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    # Exceptions crossing Ray's process boundary are pickled: keep the constructor args.
    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.__dict__.copy()))


def _rebuild(cls: type[ServeError], state: dict[str, Any]) -> ServeError:
    obj = cls.__new__(cls)
    Exception.__init__(obj, state.get("message", ""))
    obj.__dict__.update(state)
    return obj


class InvalidRequest(ServeError):
    status_code = 400
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "payload_too_large"


class ModelNotFound(ServeError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str, available: list[str]) -> None:
        super().__init__(
            f"The model {model!r} does not exist. Available models: {', '.join(sorted(available)) or '(none)'}.",
            param="model",
        )


class CapacityError(ServeError):
    status_code = 503
    error_type = "service_unavailable"
    code = "insufficient_gpu_memory"

    def __init__(self, message: str, *, retry_after_s: float = 5.0, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after_s)))}


class QueueFull(CapacityError):
    code = "queue_full"


class SessionLimit(CapacityError):
    code = "session_limit_reached"


class ModelLoadError(ServeError):
    status_code = 503
    error_type = "service_unavailable"
    code = "model_load_failed"

    def __init__(self, model: str, stage: str, cause: BaseException | str) -> None:
        detail = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else cause
        super().__init__(
            f"Model {model!r} could not {stage}: {detail}. The next request will try again; "
            "check the model's source and the replica logs if this persists."
        )
        self.model, self.stage = model, stage


class ModelUnschedulable(ServeError):
    status_code = 503
    error_type = "service_unavailable"
    code = "model_unschedulable"

    def __init__(self, model: str, reason: str) -> None:
        super().__init__(f"model {model!r} cannot be scheduled: {reason}")
        self.model = model

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "10"}


class ReplicaUnavailable(ServeError):
    status_code = 503
    error_type = "service_unavailable"
    code = "replica_unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"the model replica serving this request stopped before answering ({detail}); Serve starts a "
            "new one: retry in a few seconds"
        )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


class RouterUnavailable(ServeError):
    status_code = 503
    error_type = "service_unavailable"
    code = "router_unavailable"

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"the GPU router is not reachable ({detail}); models keep serving, but admin commands and "
            "status need it. It restarts on its own: retry in a few seconds."
        )

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "2"}


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}
