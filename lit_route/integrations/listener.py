"""The HTTP listener of ``lit-route serve``: a thread per connection, at most ``max_connections`` of them.

A request waiting for the rest of its group holds its connection (and its thread) until the group is scored, so
the bound must cover every sample a trainer can have in flight; a connection over it is answered 503 at once
(OpenRLHF retries a second later) instead of starting one more thread. Each socket read or write of a connection
waits at most the handler's ``timeout`` (``read_timeout_s``): a client that sends half a request, or keeps an idle
connection, is closed then and its slot freed. Connection errors are logged in one line, without a traceback.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
from http.server import ThreadingHTTPServer

from lit_route.checks import check_nonnegative

log = logging.getLogger(__name__)


class BoundedHTTPServer(ThreadingHTTPServer):
    """A :class:`~http.server.ThreadingHTTPServer` serving at most ``max_connections`` connections at once.

    Args:
        address: ``(host, port)`` to listen on.
        handler: The request handler class (its ``timeout`` attribute bounds each socket operation).
        max_connections: Connections served at once; the next is answered 503 and closed.
    """

    daemon_threads = True
    request_queue_size = 1024  # connections the kernel holds until accepted: trainer workers connect in bursts

    def __init__(self, address, handler, max_connections: int):
        check_nonnegative("max_connections", max_connections, integer=True, positive=True)
        self.max_connections = max_connections
        self.refused = 0
        self._slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self._slots.release()  # before the socket closes: a client that sees it closed may connect again
            self.shutdown_request(request)

    def _refuse(self, request: socket.socket) -> None:
        # in the accepting thread: a short answer, then the socket is drained of what the client already sent (a
        # close with unread data would reset the connection before the client reads the answer) and closed
        body = json.dumps({"error": f"too many connections: {self.max_connections} are open (max_connections)"})
        head = ("HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
                f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n")
        try:
            request.setblocking(False)
            request.send((head + body).encode())
            for _ in range(16):
                if not request.recv(65536):
                    break
        except OSError:  # nothing more to read now (or the client is gone): close either way
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        err = sys.exc_info()[1]
        if isinstance(err, ConnectionError | TimeoutError):  # a client that went away or stalled: routine
            log.debug("connection from %s closed: %s", client_address[0], err)
        else:
            log.warning("connection from %s failed: %s: %s", client_address[0], type(err).__name__, err)
        log.debug("the failure's traceback", exc_info=True)
