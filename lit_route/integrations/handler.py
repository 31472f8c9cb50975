"""The HTTP side of ``lit-route serve``: who may ask (the token), how a body is read, which path answers what.

A POST is checked for the token first, then its ``Content-Length``, and only then is its body read, so neither a
client without the token nor a hostile header makes the server read (or wait for) a body; every refusal is one
JSON line, and a connection whose body was left unread is closed after the answer.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler

from lit_route.integrations.access import authorized
from lit_route.integrations.openrlhf import RequestError

log = logging.getLogger(__name__)


def request_handler(owner, read_timeout_s: float) -> type[BaseHTTPRequestHandler]:
    """The request handler class of ``owner``'s listener (a :class:`~lit_route.integrations.server.RewardServer`):
    each socket read or write waits at most ``read_timeout_s``."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: trainer workers reuse their connections
        timeout = read_timeout_s  # each socket read and write of the connection

        def log_message(self, fmt, *args):
            log.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            if status == 401:
                self.send_header("www-authenticate", 'Bearer realm="lit-route", Basic realm="lit-route"')
            if self.close_connection:
                self.send_header("connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def send_error(self, code, message=None, explain=None):
            # the stdlib's own refusals (a malformed request line, too many headers), as one JSON line too
            self.close_connection = True
            self._send(code, {"error": f"{code} {message or self.responses.get(code, ('',))[0]}"})

        def _authorized(self) -> bool:
            return authorized(self.headers.get("authorization"), owner.token)

        def _refuse(self) -> None:
            owner.count("unauthorized")
            raw = self.headers.get("content-length", "0").strip()
            if raw.isascii() and raw.isdigit() and int(raw) <= 65536:
                # read a small body: a socket closed with unread data is reset, and the client may lose the answer
                self.rfile.read(int(raw))
            else:  # a larger one is not read for a client without the token: the connection is closed instead
                self.close_connection = True
            self._send(401, {"error": "unauthorized: send the server's token (Authorization: Bearer <token>, "
                                      "or as the password in the URL: http://lit-route:<token>@host:port/...)"})

        def do_GET(self):
            path = self.path.split("?")[0].rstrip("/")
            if path == "/health":
                self._send(200, owner.health(full=self._authorized()))
            elif path == "/stats":
                if not self._authorized():
                    return self._refuse()
                self._send(200, owner.stats())
            else:
                self._send(404, {"error": "no such path: POST rewards, GET /health or /stats"})

        def do_POST(self):
            if not self._authorized():
                return self._refuse()
            try:
                length = owner.bounds.content_length(self.headers)
            except RequestError as err:  # the body is left unread: the connection cannot be reused
                owner.count("bad_requests")
                self.close_connection = True
                return self._send(err.status, {"error": str(err)})
            raw = self.rfile.read(length)  # a stalled client raises TimeoutError: the stdlib closes the connection
            if len(raw) < length:  # the client closed before sending its whole body: nobody to answer
                self.close_connection = True
                return
            self._send(*owner.handle(raw, self.path.partition("?")[2]))

    return Handler
