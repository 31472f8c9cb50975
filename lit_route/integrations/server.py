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
from pathlib import Path

from lit_route.integrations.collector import GroupCollector
from lit_route.integrations.openrlhf import RequestError, parse_request, response_body
from lit_route.judges.base import JudgeBackend
from lit_route.models.backbone import BackboneSpec
from lit_route.routing.cascade import CascadeStage
from lit_route.routing.controller import BudgetTarget, Controller

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
        state_file: JSON file of the routing state (budget spent, controller, counters): read at start when it
            exists, rewritten after every answered request. Beside it, ``<state_file>.journal.jsonl`` records each
            billed judge call as it returns, so calls in flight when a server is killed are charged on restart.
        unwrap_chat: Read a chat-templated prompt (ChatML, Llama 3; OpenRLHF's ``--apply_chat_template``) as its
            messages, so the PM renders them with its own template.
    """

    def __init__(self, rewards, host: str = "127.0.0.1", port: int = 5000, group_size: int | None = None,
                 group_wait_s: float = 60.0, strip: tuple[str, ...] = (), state_file: str | None = None,
                 unwrap_chat: bool = True):
        self.rewards = rewards
        self.strip, self.unwrap_chat = tuple(strip), unwrap_chat
        self.state_file = Path(state_file) if state_file else None
        self._state_lock = threading.Lock()
        if self.state_file is not None and self.state_file.exists():
            try:
                rewards.load_state_dict(json.loads(self.state_file.read_text()))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"state_file: {self.state_file} is not a lit-route routing state ({err})") from err
            log.info("routing state (budget spent so far) restored from %s", self.state_file)
        if self.state_file is not None:  # calls billed while a killed server had them in flight are charged too
            owed = rewards.use_journal(self.state_file.with_name(self.state_file.name + ".journal.jsonl"))
            if owed:
                log.warning("%d judge calls billed to batches a previous server never finished are charged", owed)
        self.collector = GroupCollector(rewards.score_samples, group_size, group_wait_s)
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "samples": 0, "bad_requests": 0, "errors": 0, "prompt_not_in_query": 0}
        owner = self
        self.save_state()

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

        try:
            self.httpd = ThreadingHTTPServer((host, port), Handler)
        except OSError as err:  # port taken, no such interface, no permission
            raise ValueError(f"port: cannot listen on {host}:{port} ({err.strerror or err})") from err
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
            samples, missing = parse_request(body, self.strip, self.unwrap_chat)
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
        self.save_state()
        return 200, response_body([s.reward for s in scored], [s.pm_reward for s in scored],
                                  [s.judged for s in scored])

    def save_state(self) -> None:
        """Writes the routing state (ledger, controller, counters) to ``state_file``, atomically: a restarted
        server goes on with the budget it had spent."""
        if self.state_file is None:
            return
        with self._state_lock:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_name(self.state_file.name + ".tmp")
            tmp.write_text(json.dumps(self.rewards.state_dict()))
            tmp.replace(self.state_file)

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


def serve(
    pm_ckpt: str | None = None,
    judge: JudgeBackend | None = None,
    router: str = "uncertainty",
    fraction: float = 0.25,
    threshold: float | None = None,
    max_calls_per_step: int | None = None,
    max_calls_total: int | None = None,
    max_spend_usd: float | None = None,
    verdict_logit: float = 2.0,
    order: str = "random",
    cache: str | None = None,
    seed: int = 0,
    controller: Controller | None = None,
    target: BudgetTarget | None = None,
    audit_fraction: float = 0.0,
    cascade: list[CascadeStage] | None = None,
    host: str = "127.0.0.1",
    port: int = 5000,
    group_size: int | None = None,
    group_wait_s: float = 60.0,
    strip: list[str] | None = None,
    state_file: str | None = None,
    unwrap_chat: bool = True,
    device: str = "cpu",
    pm_batch_size: int = 16,
    pm_backbone: BackboneSpec | None = None,
    run: bool = True,
) -> RewardServer:
    """Serves routed pairwise rewards to OpenRLHF (``--remote_rm_url http://HOST:PORT/get_reward``).

    Args:
        pm_ckpt: A finalised preference-model checkpoint (or a ``lit-route export`` folder).
        judge: The judge backend (``class_path`` + ``init_args``); ``None``: PM scores only.
        router: ``uncertainty``, ``random`` or ``margin``.
        fraction: Share of each batch's pairs to judge; ignored when ``threshold`` or ``controller`` is set.
        threshold: Judge every pair with ū above this instead.
        max_calls_per_step: Cap on billed judge requests per scored batch.
        max_calls_total: Cap on billed judge requests over the server's life (kept in ``state_file``).
        max_spend_usd: Stop judging once the estimated spend reaches this.
        verdict_logit: c: the logit a verdict is worth (2 in the paper).
        order: Display order of the judge: ``random``, ``both`` (two calls per pair) or ``fixed``.
        cache: sqlite verdict cache (``None``: none).
        seed: Seed of the display order, the random router and the audit draw.
        controller: Moves τ between batches (``QuantileTracker`` or ``PIController``); replaces ``threshold``.
        target: What the controller aims for (default: ``fraction`` of the pairs).
        audit_fraction: Share of each batch's pairs judged at random on top of the routed ones.
        cascade: Cheaper judges for the bands below the routed pairs, in order (``judge``, ``fraction``, ``cache``
            each), as in the routing callback; ``/stats`` counts the pairs each judge answered (``judged_by``).
        host: Interface to listen on (``0.0.0.0``: every interface).
        port: Port to listen on.
        group_size: OpenRLHF's ``n_samples_per_prompt``: samples of a prompt sent in separate requests (OpenRLHF
            0.9.1+) are scored together once all have arrived. ``None``: each request carries whole groups.
        group_wait_s: Longest wait for the rest of a group before it is scored short.
        strip: End-of-turn markers cut from each response's end (the policy's EOS text, e.g. ``<|im_end|>``).
        state_file: JSON file of the budget spent and the controller; read at start, rewritten after each request.
        unwrap_chat: Read a chat-templated prompt (ChatML, Llama 3) as its messages, rendered by the PM's template.
        device: Where the PM runs (``cpu``, ``cuda``, ``cuda:N``).
        pm_batch_size: Pairs per PM forward pass.
        pm_backbone: Instead of ``pm_ckpt``, an untrained PM on this backbone (debugging only).
        run: Serve until interrupted (``False``: return the started server; for tests).
    """
    from lit_route.checks import check_device
    from lit_route.integrations.routed import RoutedRewards

    check_device("device", device)
    if pm_ckpt is None and pm_backbone is None:
        raise ValueError("pm_ckpt: no reward model given; pass a finalised PM checkpoint")
    rewards = RoutedRewards.build(
        pm_ckpt, judge, pm_backbone=pm_backbone, device=device, pm_batch_size=pm_batch_size, cache=cache,
        max_calls_per_step=max_calls_per_step, max_calls_total=max_calls_total, max_spend_usd=max_spend_usd,
        router=router, fraction=fraction, threshold=threshold, verdict_logit=verdict_logit, order=order, seed=seed,
        controller=controller, target=target, audit_fraction=audit_fraction, cascade=cascade or ())
    server = RewardServer(rewards, host, port, group_size, group_wait_s, tuple(strip or ()), state_file, unwrap_chat)
    if not run:
        return server.start()
    try:
        server.serve_forever()
    finally:
        server.save_state()
    return server


def serve_cli(args: list[str], run: bool = True):
    """``lit-route serve --config CONFIG [--port ...]`` (``run=False``: the parsed config, nothing started)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lit-route serve", parser_mode="omegaconf", default_env=False,
                            description=serve.__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(serve, skip={"run"})
    cfg = parser.parse_args(args)
    if not run:
        return cfg
    init = parser.instantiate_classes(cfg)
    serve(**{k: v for k, v in init.items() if k not in ("config", "__path__")})
