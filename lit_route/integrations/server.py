"""``lit-route serve``: a routed pairwise reward server speaking OpenRLHF's remote reward-model protocol.

``POST`` (any path but ``/health`` and ``/stats``; OpenRLHF posts to the URL it is given, e.g. ``/get_reward``)
takes ``{"query": [...], "prompts": [...], "labels": [...]}`` and answers ``{"rewards": [...], "scores": [...],
"extra_logs": {...}}`` (see :mod:`lit_route.integrations.openrlhf`). ``GET /health`` answers ``{"status": "ok"}``;
``GET /stats`` the counters: requests, samples, groups, pairs seen and routed, the routed share, billed judge
calls, spend, failures.

One process serves every trainer worker: each connection has its own thread, groups are formed across requests
by a :class:`~lit_route.integrations.collector.GroupCollector`, the PM runs one batch at a time, judge calls of
all requests share the judge event loop, and the budget is charged under one lock.
"""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from lit_route.integrations.collector import GroupCollector
from lit_route.integrations.openrlhf import RequestError, parse_request, response_body

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024 * 1024


class RewardServer:
    """The HTTP front of a routed reward: parses requests, waits for groups, answers with rewards.

    Args:
        rewards: A :class:`~lit_route.integrations.routed.RoutedRewards` (anything with ``score_samples(groups)``
            and ``stats()``).
        host: Interface to listen on.
        port: Port (0: any free port; see :attr:`url`).
        group_size: Samples per prompt (OpenRLHF's ``n_samples_per_prompt``); with it, samples of a prompt that
            arrive in separate requests are scored together. ``None``: each request carries whole groups.
        group_wait_s: How long a sample waits for the rest of its group before its group is scored short.
        strip: End-of-turn markers to cut from the end of each response (the policy's EOS text, say).
    """

    def __init__(self, rewards, host: str = "127.0.0.1", port: int = 5000, group_size: int | None = None,
                 group_wait_s: float = 60.0, strip: tuple[str, ...] = ()):
        self.rewards = rewards
        self.strip = tuple(strip)
        self.collector = GroupCollector(rewards.score_samples, group_size, group_wait_s)
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "samples": 0, "bad_requests": 0, "errors": 0, "prompt_not_in_query": 0}
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive: trainer workers reuse their connections

            def log_message(self, fmt, *args):
                log.debug("%s " + fmt, self.address_string(), *args)

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                path = self.path.split("?")[0].rstrip("/")
                if path == "/health":
                    self._send(200, {"status": "ok"})
                elif path == "/stats":
                    self._send(200, owner.stats())
                else:
                    self._send(404, {"error": f"no such path {self.path!r}: POST rewards, GET /health or /stats"})

            def do_POST(self):
                status, payload = owner.handle(self.rfile, int(self.headers.get("content-length") or 0))
                self._send(status, payload)

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def handle(self, stream, length: int) -> tuple[int, dict]:
        """One POST: (HTTP status, JSON body). Bad input is a 400 naming the field; a scoring error a 500 (the
        trainer retries); never a made-up reward."""
        try:
            if length > MAX_BODY_BYTES:
                raise RequestError(f"body: {length} bytes is over the {MAX_BODY_BYTES}-byte limit")
            try:
                body = json.loads(stream.read(length) or b"null")
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise RequestError(f"body: not JSON ({err})") from err
            samples, missing = parse_request(body, self.strip)
        except RequestError as err:
            with self._lock:
                self.counts["bad_requests"] += 1
            return 400, {"error": str(err)}
        with self._lock:
            self.counts["requests"] += 1
            self.counts["samples"] += len(samples)
            self.counts["prompt_not_in_query"] += missing
        try:
            scored = self.collector.rewards(samples)
        except Exception as err:
            log.exception("scoring a request of %d samples failed", len(samples))
            with self._lock:
                self.counts["errors"] += 1
            return 500, {"error": f"{type(err).__name__}: {err}"}
        return 200, response_body([s.reward for s in scored], [s.pm_reward for s in scored],
                                  [s.judged for s in scored])

    def stats(self) -> dict:
        """The server's counters and the routed reward's (billed calls, spend, routed share, ...)."""
        with self._lock:
            counts = dict(self.counts)
        return {**counts, **self.collector.counts, **self.rewards.stats()}

    def start(self) -> RewardServer:
        """Serves in a background thread (tests, notebooks); :meth:`serve_forever` blocks instead."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="lit-route-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        log.info("lit-route serve: listening on %s", self.url)
        try:
            self.httpd.serve_forever()
        finally:
            self.httpd.server_close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> RewardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
