"""The one error type of the API: an HTTP status and an OpenAI-style error body naming the field."""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_overloaded",  # queue_full: this replica is busy, another one (or this one shortly) may answer
}
# Codes whose type is not their status's: a 503 of a server that is stopping (or whose engine stopped) is no
# overload, and a client or balancer that branches on the type (waits and retries here when overloaded) must tell
# them apart; OpenAI's own 503s have the type `service_unavailable_error`.
_CODE_TYPES = {
    "server_shutting_down": "service_unavailable_error",
    "engine_stopped": "service_unavailable_error",
}


class APIError(Exception):
    """An answer other than success: `status`, a one-line `message`, the request field it is about (`param`,
    e.g. ``messages[0].content[1].input_audio.data``) and an optional machine-readable `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.logged = False  # the server log has it already (an answer's own line: app._Answer.log)

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, the shape OpenAI's clients parse."""
        kind = _CODE_TYPES.get(self.code or "") or _TYPES.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    """A 400 whose message starts with the field it is about. Every 400 has a code, as OpenAI's do (clients and
    retry layers branch on it; `null` read as "not a request error"): `invalid_value` unless a more precise one
    (`unsupported_parameter`, `context_length_exceeded`, `invalid_audio`, ...) is given."""
    return APIError(400, f"{param}: {message}" if param else message, param, code)
