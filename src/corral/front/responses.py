"""The answers the front door gives itself, in the OpenAI error format clients already parse.

    {"error": {"message": "...", "type": "unavailable_error", "code": 503}}

The types are llama-server's own for the same status codes, so a client cannot tell whether
llama-server or the front door said it.
"""

from __future__ import annotations

import json

_REASONS = {400: "Bad Request", 408: "Request Timeout", 413: "Content Too Large",
            431: "Request Header Fields Too Large", 501: "Not Implemented",
            502: "Bad Gateway", 503: "Service Unavailable"}
_TYPES = {400: "invalid_request_error", 408: "invalid_request_error",
          413: "invalid_request_error", 431: "invalid_request_error",
          501: "not_supported_error", 502: "server_error", 503: "unavailable_error"}

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def error_body(status: int, message: str) -> bytes:
    """The JSON body of an error answer."""
    return json.dumps({"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                                 "code": status}}).encode()


def error_response(status: int, message: str, *, retry_after_s: int | None = None,
                   close: bool = False, head_only: bool = False) -> bytes:
    """A whole HTTP/1.1 error response. ``head_only`` for HEAD requests (no body)."""
    body = error_body(status, message)
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
             "Content-Type: application/json; charset=utf-8",
             f"Content-Length: {len(body)}"]
    if retry_after_s is not None:
        lines.append(f"Retry-After: {retry_after_s}")
    if close:
        lines.append("Connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body
