"""Protocol errors: raised deep in request parsing, turned into responses at the edge."""

from __future__ import annotations

from .model import Response

_TEXT = ("content-type", "text/plain; charset=utf-8")


class ProtocolError(Exception):
    """A request the protocol rejects; carries the exact response to send."""

    def __init__(self, status: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers

    def response(self) -> Response:
        return error_response(self.status, self.message, self.headers)


def error_response(
    status: int, message: str, headers: tuple[tuple[str, str], ...] = ()
) -> Response:
    """A short plain-text error response (the body is for humans; clients use status and
    headers)."""
    return Response(status, (_TEXT, *headers), message.encode())


def unavailable(message: str) -> Response:
    """503 with Retry-After: the request certainly did not take effect; try again."""
    return error_response(503, message, (("retry-after", "1"),))


def bad_request(message: str) -> ProtocolError:
    return ProtocolError(400, message)
