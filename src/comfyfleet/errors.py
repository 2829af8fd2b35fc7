"""The project's error tree. The API turns every ``ComfyfleetError`` into the contract's envelope
``{"error": {"code", "message", "details"}}`` in one handler.

ComfyfleetError (500, internal_error)
 ├── BadRequest (400, invalid_request)
 │    └── ValidationFailed (422, invalid_request / invalid_workflow / workflow_format_ui / ...)
 ├── Unauthorized (401, unauthorized)
 ├── Forbidden (403, forbidden)
 ├── NotFound (404, not_found)
 ├── Conflict (409, conflict / hash_mismatch)
 ├── PayloadTooLarge (413, payload_too_large)
 ├── TooManyRequests (429, rate_limited / queue_full)  carries retry_after
 └── Retryable (503, retryable)  a transient failure; the caller may try again
"""

from __future__ import annotations

from typing import Any


class ComfyfleetError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        details: Any = None,
        status_code: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code
        self.details = details


class BadRequest(ComfyfleetError):
    status_code = 400
    code = "invalid_request"


class ValidationFailed(BadRequest):
    status_code = 422


class Unauthorized(ComfyfleetError):
    status_code = 401
    code = "unauthorized"


class Forbidden(ComfyfleetError):
    status_code = 403
    code = "forbidden"


class NotFound(ComfyfleetError):
    status_code = 404
    code = "not_found"


class Conflict(ComfyfleetError):
    status_code = 409
    code = "conflict"


class PayloadTooLarge(ComfyfleetError):
    status_code = 413
    code = "payload_too_large"


class TooManyRequests(ComfyfleetError):
    status_code = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Retryable(ComfyfleetError):
    status_code = 503
    code = "retryable"
