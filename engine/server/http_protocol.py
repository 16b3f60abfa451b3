"""uvicorn's h11 protocol with a 431 for oversize headers and a lingering close after refusing a request.

uvicorn answers every unparsable request with a plain-text 400 and closes the socket at once. With a
large request still arriving, closing with unread data makes the kernel send a reset, and the client
usually loses the answer. Here a request line + headers over `h11_max_incomplete_event_size` gets a 431
in the OpenAI error shape; then our side of the connection is shut (the client reads the answer and an
end of file) while what the client still sends is read and dropped, for at most `LINGER_S`.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.h11_impl import H11Protocol

LINGER_S = 2.0


def _error_body(status: int, message: str, code: str) -> bytes:
    error_type = "invalid_request_error"
    return json.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    ).encode()


class KubeinferH11Protocol(H11Protocol):
    _lingering = False

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # the refused request's remainder
        super().data_received(data)

    def send_400_response(self, msg: str) -> None:
        buffered, _ = self.conn.trailing_data
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None and len(buffered) > limit:
            status, reason, code = 431, b"Request Header Fields Too Large", "headers_too_large"
            message = f"The request line and headers are larger than the server's limit of {limit} bytes."
        else:
            status, reason, code = 400, b"Bad Request", "invalid_http"
            message = "The request is not valid HTTP/1.1."
        body = _error_body(status, message, code)
        head = (
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
            % (status, reason, len(body))
        )
        # h11 is in its error state now: write the answer directly, then close only our half.
        self.transport.write(head + body)
        self._lingering = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
