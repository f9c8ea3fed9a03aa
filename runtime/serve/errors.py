"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status.

APIError is what the server's code raises; `from_exception` maps everything else (validation
errors, the cluster's failures) onto one, so one handler answers every error the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

# exceptions that mean "no replica can take this request now" -> 503
UNAVAILABLE_NAMES = frozenset({"RayActorError", "ActorDiedError", "ActorUnavailableError", "BackPressureError",
                               "DeploymentUnavailableError", "SessionMissing", "GetTimeoutError", "TimeoutError",
                               "RayServeException", "RequestCancelledError"})
STATUS_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                503: "service_unavailable", 500: "internal_error"}


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None

    @property
    def type(self) -> str:
        return STATUS_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "internal_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


def from_exception(error: BaseException) -> APIError:
    """The APIError that answers `error`."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestValidationError):
        first = (error.errors() or [{}])[0]
        if first.get("type") == "json_invalid":
            return bad_request(f"the request body is not valid JSON ({first.get('msg', '')})", None, "invalid_json")
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        message = first.get("msg", "invalid request")
        param = ".".join(location) or None
        return bad_request(f"{param}: {message}" if param else message, param, "invalid_value")
    if isinstance(error, HTTPException):
        return APIError(error.status_code, str(error.detail), code=None)
    if any(kind.__name__ in UNAVAILABLE_NAMES for kind in type(error).__mro__):
        return APIError(503, f"no replica could take the request ({type(error).__name__}: {error})",
                        code="unavailable")
    if isinstance(error, ValueError):  # the session refused its input (too long for the store, ...)
        return bad_request(str(error))
    return APIError(500, f"{type(error).__name__}: {error}", code="internal_error")
