"""A loopback HTTP server speaking the OpenAI Chat Completions and Anthropic Messages wire formats.

Each POST takes the next scripted behaviour from a queue (``Reply``), so a test can play success, 429 with
``Retry-After``, 529, 500, slow answers, garbage bodies, truncated or reasoning answers, in order.
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    text: str = "<verdict>A</verdict>"
    status: int = 200
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0
    raw_body: bytes | None = None  # sent as is (malformed JSON, say)
    reasoning: str | None = None  # OpenAI: reasoning_content; Anthropic: a thinking block
    finish: str = "stop"
    usage: bool = True  # False: a 200 body without the usage block (some gateways strip it)


FAULTS = ("rate_limit", "overloaded", "server_error", "reset", "timeout", "garbage", "truncated", "empty")


def fault_reply(kind: str, timeout_delay_s: float = 1.5) -> Reply | None:
    """The reply that injects one kind of fault (``None`` for a dropped connection)."""
    return {
        "rate_limit": Reply(status=429, headers={"retry-after": "0.05"}),
        "overloaded": Reply(status=529),
        "server_error": Reply(status=500),
        "reset": None,
        "timeout": Reply(delay_s=timeout_delay_s),
        "garbage": Reply(raw_body=b'{"choices": [tru'),
        "truncated": Reply("Response A is better because", finish="length"),
        "empty": Reply(""),
    }[kind]


class Loopback:
    """``fault_rate``: share of requests answered with a random fault from ``FAULTS`` (seeded). ``port``: reuse the
    port of an earlier server, so that a rerun talks to the same ``base_url`` (part of the verdict cache key).
    ``latency_s``: each answer waits a time drawn uniformly from ``(low, high)`` (seeded), like a slow judge.
    :meth:`hold` keeps the answers of requests back until :meth:`release` (or exit, when they are dropped: a
    client killed with calls in flight); a held request is billed, as a provider bills a request it received
    whatever becomes of its answer (:attr:`billed`). :meth:`wait_held` waits until the server holds n requests."""

    def __init__(self, default: Reply | None = None, fault_rate: float = 0.0, seed: int = 0,
                 timeout_delay_s: float = 1.5, answer=None, port: int = 0,
                 latency_s: tuple[float, float] | None = None):
        import random

        self.latency_s, self.latency_rng = latency_s, random.Random(seed + 1)
        self.hold_from: int | None = None  # requests from this arrival number on are held
        self.holding = 0  # held now (billable ones)
        self.releases, self.closing = 0, False

        self.script: list[Reply] = []
        self.default = default or Reply()
        self.fault_rate, self.rng, self.timeout_delay_s = fault_rate, random.Random(seed), timeout_delay_s
        self.injected: dict[str, int] = {}
        self.answer = answer  # body -> Reply, for content-dependent answers
        self.requests: list[dict] = []
        self.completions = 0  # 200 answers with a well-formed body sent (held ones are billed too: billed)
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # a request held, the hold released, the server closing
        owner = self

        class Handler(BaseHTTPRequestHandler):
            # HTTP/1.1 keeps connections open between requests, as real API servers do: a client whose
            # connection pool outlives an event loop is caught here, not in production
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with owner.lock:
                    held = owner.hold_from is not None and len(owner.requests) >= owner.hold_from
                    owner.requests.append({"path": self.path, "body": body, "headers": dict(self.headers)})
                    reply = owner.script.pop(0) if owner.script else owner.default
                    if not owner.script and owner.fault_rate and owner.rng.random() < owner.fault_rate:
                        kind = owner.rng.choice(FAULTS)
                        owner.injected[kind] = owner.injected.get(kind, 0) + 1
                        reply = fault_reply(kind, owner.timeout_delay_s)
                        if reply is None:  # drop the connection without an answer
                            self.close_connection = True
                            self.connection.shutdown(2)
                            return
                    if callable(getattr(owner, "answer", None)) and reply is owner.default:
                        reply = owner.answer(body)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if owner.latency_s is not None:
                    with owner.lock:
                        delay = owner.latency_rng.uniform(*owner.latency_s)
                    time.sleep(delay)
                if held and not owner.wait_release(reply.status == 200 and reply.raw_body is None):
                    self.close_connection = True  # the client was killed: the answer is dropped, still billed
                    return
                if reply.raw_body is not None:
                    payload = reply.raw_body
                elif reply.status != 200:
                    payload = json.dumps({"type": "error", "error": {"type": "overloaded_error" if reply.status == 529
                                                                     else "api_error", "message": "scripted"}}).encode()
                elif self.path.endswith("/messages"):
                    payload = json.dumps(anthropic_body(body, reply)).encode()
                else:
                    payload = json.dumps(openai_body(body, reply)).encode()
                if reply.status == 200 and reply.raw_body is None:
                    with owner.lock:
                        owner.completions += 1
                try:
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    for k, v in reply.headers.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self.server = _QuietServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def hold(self, after: int = 0) -> None:
        """Holds the answers of every request but the next ``after`` ones (see the class docstring)."""
        with self.lock:
            self.hold_from = len(self.requests) + after

    def release(self) -> None:
        """Answers the held requests, and answers again from now on."""
        with self.lock:
            self.hold_from = None
            self.releases += 1
            self.changed.notify_all()

    def wait_held(self, n: int, timeout: float) -> bool:
        """Whether the server holds ``n`` requests (billable ones) within ``timeout`` seconds."""
        with self.lock:
            return self.changed.wait_for(lambda: self.holding >= n, timeout=timeout)

    def wait_release(self, billable: bool) -> bool:
        """A request held until :meth:`release` (``True``: answer it) or exit (``False``: drop it, billed)."""
        with self.lock:
            releases = self.releases
            self.holding += int(billable)
            self.changed.notify_all()
            self.changed.wait_for(lambda: self.releases > releases or self.closing)
            if self.releases > releases:
                self.holding -= int(billable)  # billed when its answer goes out, as any other
                return True
            return False

    @property
    def billed(self) -> int:
        """What a provider would bill: well-formed 200 answers sent, and the requests whose answers it holds."""
        with self.lock:
            return self.completions + self.holding

    def __exit__(self, *exc):
        with self.lock:
            self.closing = True
            self.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # clients that time out or drop a kept-alive connection are part of the tests, not server errors
        pass


def openai_body(request: dict, reply: Reply) -> dict:
    message = {"role": "assistant", "content": reply.text}
    if reply.reasoning is not None:
        message["reasoning_content"] = reply.reasoning
    return {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": request.get("model", "m"),
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish}],
        **({"usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}} if reply.usage else {}),
    }


def anthropic_body(request: dict, reply: Reply) -> dict:
    content = []
    if reply.reasoning is not None:
        content.append({"type": "thinking", "thinking": reply.reasoning, "signature": "sig"})
    content.append({"type": "text", "text": reply.text})
    return {
        "id": "msg_1", "type": "message", "role": "assistant", "model": request.get("model", "m"),
        "content": content, "stop_reason": "max_tokens" if reply.finish == "length" else "end_turn",
        "stop_sequence": None, **({"usage": {"input_tokens": 100, "output_tokens": 20}} if reply.usage else {}),
    }


_A = re.compile(r"<response_a>\n(.*)\n</response_a>", re.S)
_B = re.compile(r"<response_b>\n(.*)\n</response_b>", re.S)


def longer_is_better(body: dict) -> Reply:
    """A position-independent judge for ``Loopback(answer=...)``: prefers the longer response."""
    user = body["messages"][-1]["content"]
    a, b = _A.search(user).group(1), _B.search(user).group(1)
    return Reply(f"The longer one is more complete.\n<verdict>{'A' if len(a) >= len(b) else 'B'}</verdict>")
