"""``lit-route serve``: a routed pairwise reward server speaking OpenRLHF's remote reward-model protocol.

``POST`` (any path but ``/health`` and ``/stats``; OpenRLHF posts to the URL it is given, e.g. ``/get_reward``)
takes ``{"query": [...], "prompts": [...], "labels": [...]}`` and answers ``{"rewards": [...], "scores": [...],
"extra_logs": {...}}`` (see :mod:`lit_route.integrations.openrlhf`); ``?group_size=K`` in the URL names the
request's samples per prompt. ``GET /health`` answers ``{"status": "ok"}`` (``degraded`` or ``failing`` when the
judge fails, with the reason); ``GET /stats`` the counters: requests, samples, groups, pairs seen and routed, the
routed share, billed judge calls, spend, failures.

Beyond loopback the server requires a token (:mod:`lit_route.integrations.access`) on every POST and on
``/stats``; requests are bounded (:mod:`lit_route.integrations.bounds`), and so are connections and the time a
socket may stall (:mod:`lit_route.integrations.listener`). One process serves every trainer worker: each
connection has its own thread, groups are formed across requests by a
:class:`~lit_route.integrations.collector.GroupCollector`, the PM runs one batch at a time, judge calls of all
requests share the judge event loop, and the budget is charged under one lock.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from lit_route.checks import check_nonnegative
from lit_route.integrations.access import DEFAULT_TOKEN_ENV, is_loopback, server_token
from lit_route.integrations.bounds import RequestBounds
from lit_route.integrations.collector import GroupCollector
from lit_route.integrations.handler import request_handler
from lit_route.integrations.listener import BoundedHTTPServer
from lit_route.integrations.openrlhf import RequestError, parse_request, response_body
from lit_route.judges.base import JudgeBackend
from lit_route.models.backbone import BackboneSpec
from lit_route.routing.cascade import CascadeStage
from lit_route.routing.controller import BudgetTarget, Controller
from lit_route.routing.health import JudgeFailing

log = logging.getLogger(__name__)


def check_listen_options(port, group_size, group_wait_s, bounds: RequestBounds, max_connections,
                         read_timeout_s) -> None:
    """The server's own options, each refused in one line naming it."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port: expected an integer in 0..65535; got {port!r}")
    if group_size is not None and (not isinstance(group_size, int) or not 2 <= group_size <= bounds.max_group_size):
        raise ValueError(f"group_size: expected an integer in 2..{bounds.max_group_size} (max_group_size) or null; "
                         f"got {group_size!r}")
    check_nonnegative("group_wait_s", group_wait_s)
    check_nonnegative("max_connections", max_connections, integer=True, positive=True)
    check_nonnegative("read_timeout_s", read_timeout_s, positive=True)


class RewardServer:
    """The HTTP front of a routed reward: parses requests, waits for groups, answers with rewards.

    Args:
        rewards: A :class:`~lit_route.integrations.routed.RoutedRewards` (anything with ``score_samples(groups)``
            and ``stats()``; ``judge_health()`` when it has one).
        host: Interface to listen on; any but a loopback address needs a ``token``.
        port: Port (0: any free port; see :attr:`url`).
        group_size: Samples per prompt (OpenRLHF's ``n_samples_per_prompt``); with it, samples of a prompt that
            arrive in separate requests are scored together. ``None``: each request carries whole groups.
        group_wait_s: How long a sample waits for the rest of its group before its group is scored short.
        strip: End-of-turn markers to cut from the end of each response (the policy's EOS text, say).
        state_file: JSON file of the routing state (budget spent, controller, counters): read at start when it
            exists, rewritten after every answered request. Beside it, ``<state_file>.journal.jsonl`` records each
            billed judge call as it returns, so calls in flight when a server is killed are charged on restart.
        unwrap_chat: Read a chat-templated prompt (ChatML, Llama 3; OpenRLHF's ``--data.apply_chat_template``) as
            its messages, so the PM renders them with its own template.
        token: The token every POST and ``GET /stats`` must carry (``None``: none asked; loopback hosts only).
        bounds: What one request may ask for (default: :class:`~lit_route.integrations.bounds.RequestBounds`).
        max_connections: Connections served at once (each waiting request holds one).
        read_timeout_s: Longest wait of one socket read or write; a stalled or idle connection is then closed.
    """

    def __init__(self, rewards, host: str = "127.0.0.1", port: int = 5000, group_size: int | None = None,
                 group_wait_s: float = 60.0, strip: tuple[str, ...] = (), state_file: str | None = None,
                 unwrap_chat: bool = True, *, token: str | None = None, bounds: RequestBounds | None = None,
                 max_connections: int = 4096, read_timeout_s: float = 60.0):
        if token is None and not is_loopback(host):
            raise ValueError(f"host: {host or 'every interface'} can be reached from other machines: give a token")
        self.bounds = bounds or RequestBounds()
        check_listen_options(port, group_size, group_wait_s, self.bounds, max_connections, read_timeout_s)
        self.rewards, self.token = rewards, token
        self.strip, self.unwrap_chat = tuple(strip), unwrap_chat
        self.collector = GroupCollector(rewards.score_samples, group_size, group_wait_s)
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
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "samples": 0, "bad_requests": 0, "unauthorized": 0, "errors": 0,
                       "judge_failing": 0, "prompt_not_in_query": 0, "truncated_responses": 0}
        self.save_state()

        try:
            self.httpd = BoundedHTTPServer((host, port), request_handler(self, read_timeout_s), max_connections)
        except OSError as err:  # port taken, no such interface, no permission
            raise ValueError(f"port: cannot listen on {host}:{port} ({err.strerror or err})") from err
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def handle(self, raw: bytes, query: str = "") -> tuple[int, dict]:
        """One POST's body and URL query: (HTTP status, JSON body). Bad input is a 400 naming the field (413 for
        a body over its size), a judge failing for good a 503, any other scoring error a 500 (the trainer
        retries); never a made-up reward."""
        try:
            group_size = self.bounds.group_size(query)
            try:
                body = json.loads(raw or b"null")
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise RequestError(f"body: not JSON ({err})") from None
            except RecursionError:  # "[[[[..." 100,000 deep
                raise RequestError("body: JSON nested too deeply") from None
            samples, missing = parse_request(body, self.strip, self.unwrap_chat)
            samples, truncated = self.bounds.apply(samples, group_size or self.collector.group_size)
        except RequestError as err:
            self.count("bad_requests")
            return err.status, {"error": str(err)}
        with self._lock:
            self.counts["requests"] += 1
            self.counts["samples"] += len(samples)
            self.counts["prompt_not_in_query"] += missing
            self.counts["truncated_responses"] += truncated
        try:
            scored = self.collector.rewards(samples, group_size)
        except JudgeFailing as err:  # logged once by the routed reward; every request of the batch learns why
            self.count("judge_failing")
            return 503, {"error": str(err)}
        except Exception as err:
            log.exception("scoring a request of %d samples failed", len(samples))
            self.count("errors")
            return 500, {"error": f"{type(err).__name__}: {err}"}
        self.save_state()
        return 200, response_body([s.reward for s in scored], [s.pm_reward for s in scored],
                                  [s.judged for s in scored])

    def count(self, name: str) -> None:
        """Adds one to a counter of /stats."""
        with self._lock:
            self.counts[name] += 1

    def health(self, full: bool = True) -> dict:
        """``{"status": "ok"}``, or the judge's ``degraded`` / ``failing`` status; with ``full``, its reason."""
        judge_health = getattr(self.rewards, "judge_health", None)
        health = judge_health() if judge_health is not None else {"status": "ok"}
        return health if full else {"status": health["status"]}

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
        return {**counts, "refused_connections": self.httpd.refused, **self.collector.counts,
                **self.rewards.stats(), "judge": self.health()}

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
    max_consecutive_errors: int | None = 3,
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
    auth_token_env: str = DEFAULT_TOKEN_ENV,
    group_size: int | None = None,
    group_wait_s: float = 60.0,
    strip: list[str] | None = None,
    state_file: str | None = None,
    unwrap_chat: bool = True,
    max_body_bytes: int = RequestBounds.max_body_bytes,
    max_group_size: int = RequestBounds.max_group_size,
    max_pairs_per_request: int = RequestBounds.max_pairs_per_request,
    max_prompt_chars: int = RequestBounds.max_prompt_chars,
    max_response_chars: int = RequestBounds.max_response_chars,
    max_connections: int = 4096,
    read_timeout_s: float = 60.0,
    device: str = "cpu",
    pm_batch_size: int = 16,
    pm_backbone: BackboneSpec | None = None,
    run: bool = True,
) -> RewardServer:
    """Serves routed pairwise rewards to OpenRLHF (``--reward.remote_url http://HOST:PORT/get_reward``).

    Args:
        pm_ckpt: A finalised preference-model checkpoint (or a ``lit-route export`` folder).
        judge: The judge backend (``class_path`` + ``init_args``); ``None``: PM scores only.
        router: ``uncertainty``, ``random`` or ``margin``.
        fraction: Share of each batch's pairs to judge; ignored when ``threshold`` or ``controller`` is set.
        threshold: Judge every pair with ū above this instead.
        max_calls_per_step: Cap on billed judge requests per scored batch.
        max_calls_total: Cap on billed judge requests over the server's life (kept in ``state_file``).
        max_spend_usd: Stop judging once the estimated spend reaches this.
        max_consecutive_errors: Batches in a row in which the judge may raise, or fail every routed pair with a
            client error (a rejected key) or a connection failure, before requests are answered 503 with the
            reason (``GET /health``: ``failing``); ``None``: never (the PM scores stand).
        verdict_logit: c: the logit a verdict is worth (2 in the paper).
        order: Display order of the judge: ``random``, ``both`` (two calls per pair) or ``fixed``.
        cache: sqlite verdict cache (``None``: none).
        seed: Seed of the display order, the random router and the audit draw.
        controller: Moves τ between batches (``QuantileTracker`` or ``PIController``); replaces ``threshold``.
        target: What the controller aims for (default: ``fraction`` of the pairs).
        audit_fraction: Share of each batch's pairs judged at random on top of the routed ones.
        cascade: Cheaper judges for the bands below the routed pairs, in order (``judge``, ``fraction``, ``cache``
            each), as in the routing callback; ``/stats`` counts the pairs each judge answered (``judged_by``).
        host: Interface to listen on (``0.0.0.0``: every interface; any but loopback needs a token).
        port: Port to listen on.
        auth_token_env: Environment variable holding the token clients must send (``Authorization: Bearer``, or
            the password of the URL); required unless ``host`` is a loopback address.
        group_size: OpenRLHF's ``--rollout.n_samples_per_prompt``: samples of a prompt sent in separate requests
            are scored together once all have arrived (a request may name its own with ``?group_size=K``).
            ``None``: each request carries whole groups.
        group_wait_s: Longest wait for the rest of a group before it is scored short.
        strip: End-of-turn markers cut from each response's end (the policy's EOS text, e.g. ``<|im_end|>``).
        state_file: JSON file of the budget spent and the controller; read at start, rewritten after each request.
        unwrap_chat: Read a chat-templated prompt (ChatML, Llama 3) as its messages, rendered by the PM's template.
        max_body_bytes: Largest request body (413 above it).
        max_group_size: Most samples of one prompt scored together.
        max_pairs_per_request: Most pairs the groups of one request may make.
        max_prompt_chars: Longest prompt, in characters.
        max_response_chars: Responses are cut to this many characters before the PM and the judge read them.
        max_connections: Connections served at once (a request waiting for its group holds one): at least the
            samples a trainer can have in flight.
        read_timeout_s: Longest wait of one socket read or write (a stalled or idle connection is closed).
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
    # the listening settings first: a wrong one is reported before the PM is loaded
    token = server_token(host, auth_token_env)
    bounds = RequestBounds(max_body_bytes, max_group_size, max_pairs_per_request, max_prompt_chars,
                           max_response_chars)
    check_listen_options(port, group_size, group_wait_s, bounds, max_connections, read_timeout_s)
    rewards = RoutedRewards.build(
        pm_ckpt, judge, pm_backbone=pm_backbone, device=device, pm_batch_size=pm_batch_size, cache=cache,
        max_calls_per_step=max_calls_per_step, max_calls_total=max_calls_total, max_spend_usd=max_spend_usd,
        max_consecutive_errors=max_consecutive_errors, router=router, fraction=fraction, threshold=threshold,
        verdict_logit=verdict_logit, order=order, seed=seed, controller=controller, target=target,
        audit_fraction=audit_fraction, cascade=cascade or ())
    server = RewardServer(rewards, host, port, group_size, group_wait_s, tuple(strip or ()), state_file, unwrap_chat,
                          token=token, bounds=bounds, max_connections=max_connections, read_timeout_s=read_timeout_s)
    if not run:
        return server.start()
    if token is not None:
        log.info("clients must send the token in $%s", auth_token_env)
    try:
        server.serve_forever()
    finally:
        server.save_state()
    return server


# what a parser's refusal of these options leaves unsaid
_EXPECTED = {
    "strip": "a list of end-of-turn strings, e.g. --strip '[\"<|im_end|>\"]' (strip: [\"<|im_end|>\"] in a config)",
}


def serve_cli(args: list[str], run: bool = True):
    """``lit-route serve --config CONFIG [--port ...]`` (``run=False``: the parsed config, nothing started)."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    from lit_route.usage import UsageError

    parser = ArgumentParser(prog="lit-route serve", parser_mode="omegaconf", default_env=False,
                            description=serve.__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(serve, skip={"run"})
    try:
        cfg = parser.parse_args(args)
    except UsageError as err:
        option = str(err).partition(":")[0]
        if option in _EXPECTED:
            raise UsageError(f"{option}: expected {_EXPECTED[option]}") from None
        raise
    if not run:
        return cfg
    init = parser.instantiate_classes(cfg)
    serve(**{k: v for k, v in init.items() if k not in ("config", "__path__")})
