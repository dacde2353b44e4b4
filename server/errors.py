"""User errors on the wire: a `VidsieveError` becomes a WebSocket error code or an HTTP status
with an OpenAI-style error body, never a stack trace."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from compressors import BudgetError, SpecError
from kernels.attention import AttentionSpecError
from kernels.errors import VidsieveError
from server.media import MediaAccessError, MediaTooLargeError
from server.schemas import ErrorDetail, ErrorResponse
from streaming.media import MediaError
from streaming.session import SessionError
from streaming.video import SamplingPlanError, VideoDecodeError
from vlm.model import UnknownModelError
from vlm.reuse import ReuseSpecError

HTTP_STATUS = {
    "invalid_json": 400,
    "unauthorized": 401,
    "media_forbidden": 403,
    "unknown_model": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "body_too_large": 413,
    "media_too_large": 413,
    "server_full": 429,
    "internal": 500,
    "shutting_down": 503,
    "not_ready": 503,
}  # anything else a client sent wrong: 422
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    """An HTTP error response: status from the code, a sentence for the client."""

    def __init__(self, code: str, message: str, *, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.param, self.headers = code, message, param, headers or {}

    @property
    def status(self) -> int:
        return HTTP_STATUS.get(self.code, 422)

    def response(self) -> JSONResponse:
        body = ErrorResponse(error=ErrorDetail(message=self.message, type=ERROR_TYPES.get(self.status, "invalid_request_error"),
                                               code=self.code, param=self.param))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


def error_code(error: VidsieveError) -> str:
    """The wire code of a user error (the same on WebSocket and HTTP)."""
    if isinstance(error, SessionError):
        return error.code
    if isinstance(error, (SpecError, BudgetError, AttentionSpecError, ReuseSpecError)):
        return "bad_spec"
    if isinstance(error, UnknownModelError):
        return "unknown_model"
    if isinstance(error, MediaAccessError):
        return "media_forbidden"
    if isinstance(error, MediaTooLargeError):
        return "media_too_large"
    if isinstance(error, (MediaError, VideoDecodeError, SamplingPlanError)):
        return "bad_media"
    return "bad_request"


def api_error(error: VidsieveError, retry_after_s: int = 1) -> ApiError:
    code = error_code(error)
    headers = {"Retry-After": str(retry_after_s)} if code in ("server_full", "shutting_down") else None
    return ApiError(code, str(error), headers=headers)
