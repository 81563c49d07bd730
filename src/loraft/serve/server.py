"""The HTTP server: uvicorn's, with a cap on open connections and a deadline for each request's headers
(uvicorn has neither: an idle or slow connection would otherwise stay open for ever). The body's own
deadline is app.BodyLimit's."""

import json
from http import HTTPStatus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class GuardedProtocol(H11Protocol):
    """One connection. Over `max_connections` it is answered 503 and closed; a request whose headers have
    not all arrived `read_timeout_s` after the connection opened (or after its previous response) is
    answered 408 and closed, and an idle connection closed."""

    max_connections = 200
    read_timeout_s = 10.0

    def connection_made(self, transport):
        super().connection_made(transport)
        self.headers_timer, self.partial = None, False
        if len(self.connections) > self.max_connections:
            return self.refuse(503, f"the server has {self.max_connections} connections open, its limit; retry shortly")
        self.start_timer()

    def data_received(self, data: bytes):
        self.partial = True
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the headers are in
            self.stop_timer()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.partial = False
            self.start_timer()

    def connection_lost(self, exc):
        self.stop_timer()
        super().connection_lost(exc)

    def start_timer(self):
        self.stop_timer()
        self.headers_timer = self.loop.call_later(self.read_timeout_s, self.headers_too_slow)

    def stop_timer(self):
        if self.headers_timer is not None:
            self.headers_timer.cancel()
            self.headers_timer = None

    def headers_too_slow(self):
        if self.partial:
            self.refuse(408, f"the request's headers did not arrive within {self.read_timeout_s:g} s")
        else:
            self.transport.close()

    def refuse(self, status: int, message: str):
        body = json.dumps({"error": message}).encode()
        head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"
        headers = f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n"
        if status == 503:
            headers += "retry-after: 1\r\n"
        self.transport.write(f"{head}\r\n{headers}\r\n".encode() + body)
        self.transport.close()


def server(app, limits) -> uvicorn.Server:
    """A uvicorn server of `app` with `limits`' connection cap and read deadline; run it with
    .run(sockets=[a listening socket])."""
    protocol = type(
        "Protocol",
        (GuardedProtocol,),
        {"max_connections": limits.max_connections, "read_timeout_s": limits.read_timeout_s},
    )
    return uvicorn.Server(uvicorn.Config(app, http=protocol, log_level="warning", timeout_keep_alive=5))
