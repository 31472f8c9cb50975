"""`lit-route serve` exposed: the token, request bounds, hostile bodies, connection bounds and a judge that fails
for good, each from real clients (requests, aiohttp, raw sockets) against a real server on loopback."""

import asyncio
import contextlib
import http.client
import json
import logging
import socket
from urllib.parse import urlsplit

import pytest
import requests
import torch
from loopback import Loopback, Reply
from test_reward_server import EOS, POLICY, batch_body

from lit_route.integrations.bounds import RequestBounds
from lit_route.integrations.routed import RoutedRewards, build_decision
from lit_route.integrations.server import RewardServer, serve
from lit_route.judges.function import FunctionJudge
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.models.backbone import BackboneSpec
from lit_route.policy.pm_scoring import load_reward_pm

TOKEN = "0123456789abcdef0123456789abcdef"


@pytest.fixture(scope="module")
def tiny_pm():
    torch.manual_seed(0)
    return load_reward_pm(None, BackboneSpec())


def exchange(url: str, data: bytes, timeout: float = 30.0) -> tuple[int, dict]:
    """Sends ``data`` as it is on a new connection and reads one answer: (status, JSON body)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(data)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, json.loads(answer.read())


def post_bytes(body: bytes, length: str | None = None) -> bytes:
    head = f"POST /get_reward HTTP/1.1\r\nHost: x\r\nContent-Length: {length or len(body)}\r\n\r\n"
    return head.encode() + body


def test_beyond_loopback_a_token_is_required_and_checked(tiny_pm, monkeypatch):
    monkeypatch.delenv("LIT_ROUTE_SERVE_TOKEN", raising=False)
    with pytest.raises(ValueError, match=r"^host: 0\.0\.0\.0 can be reached from other machines and "
                                         r"\$LIT_ROUTE_SERVE_TOKEN is not set: export LIT_ROUTE_SERVE_TOKEN="):
        serve(pm_backbone=BackboneSpec(), host="0.0.0.0", port=0, run=False)
    monkeypatch.setenv("MY_TOKEN", "short")
    with pytest.raises(ValueError, match=r"^auth_token_env: \$MY_TOKEN must be 16 or more"):
        serve(pm_backbone=BackboneSpec(), port=0, auth_token_env="MY_TOKEN", run=False)

    pm, encoder = tiny_pm
    with RewardServer(RoutedRewards(pm, encoder), port=0, token=TOKEN) as server:
        url, bearer = f"{server.url}/get_reward", {"Authorization": f"Bearer {TOKEN}"}
        body = batch_body([1])
        refused = [requests.post(url, json=body, timeout=30),
                   requests.post(url, json=body, headers={"Authorization": f"Bearer {TOKEN[:-1]}x"}, timeout=30),
                   requests.post(url, json=body, auth=("lit-route", "not-the-token-at-all"), timeout=30),
                   requests.get(f"{server.url}/stats", timeout=30)]
        accepted = [requests.post(url, json=body, headers=bearer, timeout=60),
                    # requests and aiohttp send a URL's password as Basic authentication: OpenRLHF's clients
                    requests.post(url.replace("//", f"//lit-route:{TOKEN}@"), json=body, timeout=60)]

        async def openrlhf_post():  # as OpenRLHF 0.10+'s SingleTurnAgentExecutor posts: no headers of its own
            import aiohttp

            async with aiohttp.ClientSession() as session, session.post(
                    url.replace("//", f"//lit-route:{TOKEN}@"), json=body) as answer:
                return answer.status, await answer.json()

        aiohttp_status, aiohttp_body = asyncio.run(openrlhf_post())
        health = requests.get(f"{server.url}/health", timeout=30).json()
        stats = requests.get(f"{server.url}/stats", headers=bearer, timeout=30).json()
    assert [r.status_code for r in refused] == [401] * 4
    assert all(r.json()["error"].startswith("unauthorized: send the server's token") for r in refused)
    assert [r.status_code for r in accepted] == [200, 200] and aiohttp_status == 200
    assert aiohttp_body["rewards"] == accepted[0].json()["rewards"]
    assert health == {"status": "ok"}  # open, and nothing more than the status
    assert stats["unauthorized"] == 4 and stats["requests"] == 3 and stats["pairs_seen"] == 0  # no judge: PM only


def test_requests_over_their_bounds_buy_nothing(tiny_pm):
    """100 samples of one prompt (4,950 pairs), too many pairs, a body over its size and an over-long prompt are
    refused before the PM or the judge sees them; a long response is cut before both read it."""
    pm, encoder = tiny_pm
    seen: list[int] = []

    def longer(prompt, a, b):
        seen.extend((len(a), len(b)))
        return "A" if len(a) >= len(b) else "B"

    judge = FunctionJudge(longer)
    bounds = RequestBounds(max_body_bytes=64 * 1024, max_pairs_per_request=10, max_prompt_chars=200,
                           max_response_chars=40)
    rewards = RoutedRewards(pm, encoder, build_decision(judge, fraction=1.0, order="fixed"))
    with RewardServer(rewards, port=0, strip=(EOS,), bounds=bounds) as server:
        hundred = requests.post(server.url, json={"query": [f"p {i}" for i in range(100)], "prompts": ["p"] * 100},
                                timeout=30)
        pairs = requests.post(server.url, json=batch_body([1, 2]), timeout=30)  # two groups of 4: 12 pairs
        prompt = requests.post(server.url, json={"query": ["x" * 300 + " a"] * 2, "prompts": ["x" * 300] * 2},
                               timeout=30)
        big = exchange(server.url, post_bytes(b"", str(10 * 1024 * 1024)))  # announced, never sent: not awaited
        assert judge.stats.billed == 0 and rewards.stats()["pairs_seen"] == 0
        long = requests.post(server.url, json={"query": ["p " + "a" * 100, "p " + "b" * 30, "p " + "c" * 50],
                                               "prompts": ["p "] * 3}, timeout=60)
        stats = server.stats()
    assert hundred.status_code == 400
    assert hundred.json() == {"error": "prompts: 100 samples of one prompt, over max_group_size=64 (samples scored "
                                       "together, every pair compared)"}
    assert pairs.status_code == 400 and pairs.json()["error"] == ("prompts: the request's groups make 12 pairs, "
                                                                  "over max_pairs_per_request=10")
    assert prompt.status_code == 400 and prompt.json()["error"] == "prompts[0]: 300 characters, over max_prompt_chars=200"
    assert big == (413, {"error": "body: 10485760 bytes is over max_body_bytes=65536"})
    assert long.status_code == 200 and max(seen) == 40 and len(seen) == 2 * 3  # every pair judged, cut responses
    assert stats["truncated_responses"] == 2 and stats["bad_requests"] == 4 and stats["billed"] == 3


def test_hostile_bodies_get_one_line_400s_and_no_traceback(tiny_pm, capfd, caplog):
    pm, encoder = tiny_pm
    caplog.set_level(logging.WARNING, logger="lit_route")  # a scoring failure logs its traceback at ERROR
    with RewardServer(RoutedRewards(pm, encoder), port=0) as server:
        answers = {
            # json.loads accepts a lone surrogate; the tokenizer does not (a 500 retried by OpenRLHF)
            "surrogate": exchange(server.url, post_bytes(b'{"query": ["p a\\ud800", "p b"], "prompts": ["p", "p"]}')),
            "nested": exchange(server.url, post_bytes(b"[" * 100_000)),
            "length abc": exchange(server.url, post_bytes(b"", "abc")),
            "length -1": exchange(server.url, post_bytes(b"", "-1")),
            "not utf-8": exchange(server.url, post_bytes(b'{"query": ["\xff"]}')),
        }
        stats = server.stats()
    assert answers == {
        "surrogate": (400, {"error": "query[0]: not valid Unicode (surrogates not allowed at character 3)"}),
        "nested": (400, {"error": "body: JSON nested too deeply"}),
        "length abc": (400, {"error": "content-length: expected one number of bytes; got 'abc'"}),
        "length -1": (400, {"error": "content-length: expected one number of bytes; got '-1'"}),
        "not utf-8": (400, {"error": "body: not JSON ('utf-8' codec can't decode byte 0xff in position 12: "
                                     "invalid start byte)"}),
    }
    assert stats["bad_requests"] == 5 and stats["errors"] == 0 and stats["requests"] == 0
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and not any(r.exc_info for r in caplog.records)


def half_sent(url: str) -> socket.socket:
    """A connection that sent half a request's headers and then nothing."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    return sock


def test_connections_over_the_bound_are_refused_and_held_ones_still_served(tiny_pm):
    pm, encoder = tiny_pm
    with RewardServer(RoutedRewards(pm, encoder), port=0, max_connections=2, read_timeout_s=60) as server:
        held = [half_sent(server.url), half_sent(server.url)]  # accepted in order: they hold both slots
        parts = urlsplit(server.url)
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as third:
            answer = http.client.HTTPResponse(third)  # the answer comes before any request is sent
            answer.begin()
            refused = answer.status, json.loads(answer.read())
        for sock in held:  # the held connections finish their requests and are answered
            sock.sendall(b"\r\n")
            reply = http.client.HTTPResponse(sock)
            reply.begin()
            assert reply.status == 200 and json.loads(reply.read()) == {"status": "ok"}
            sock.close()
        refused_count = server.httpd.refused
    assert refused == (503, {"error": "too many connections: 2 are open (max_connections)"}) and refused_count == 1


def test_a_stalled_connection_is_closed_after_the_read_timeout_and_frees_its_slot(tiny_pm):
    pm, encoder = tiny_pm
    with RewardServer(RoutedRewards(pm, encoder), port=0, max_connections=1, read_timeout_s=0.5) as server:
        with half_sent(server.url) as stalled:
            # the server closes it (b""), well before this socket's own 30 s guard would raise
            assert stalled.recv(1024) == b""
        # its slot was freed before the close was sent: the one allowed connection is free again
        assert requests.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}


@pytest.mark.parametrize("kind", ["rejected key", "judge down"])
def test_a_judge_failing_for_good_is_answered_503_and_shown_in_health(tiny_pm, monkeypatch, caplog, kind):
    """401 from the judge (a wrong key) or no judge at all: after max_consecutive_errors batches whose routed
    pairs all failed so, requests get a 503 naming the reason, /health says failing, one error line is logged;
    a judge that answers again clears it."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    pm, encoder = tiny_pm
    with contextlib.ExitStack() as running:
        judge_server = running.enter_context(Loopback(default=Reply(status=401)))
        if kind == "judge down":
            running.close()  # the judge server is gone: its port refuses connections
        judge = OpenAICompatibleJudge("m", base_url=f"{judge_server.url}/v1", policy=POLICY)
        rewards = RoutedRewards(pm, encoder, build_decision(judge, fraction=1.0, order="fixed"),
                                max_consecutive_errors=1)
        with RewardServer(rewards, port=0, strip=(EOS,)) as server:
            first = requests.post(server.url, json=batch_body([1]), timeout=60)
            degraded = requests.get(f"{server.url}/health", timeout=30).json()
            second = requests.post(server.url, json=batch_body([2]), timeout=60)
            failing = requests.get(f"{server.url}/health", timeout=30).json()
            if kind == "rejected key":  # the key is fixed: the judge answers, the server is healthy again
                judge_server.default = Reply()
                third = requests.post(server.url, json=batch_body([3]), timeout=60)
                assert third.status_code == 200 and sum(third.json()["extra_logs"]["judged_pairs"]) == 12
                assert requests.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}
            stats = server.stats()
    reason = "client_error: Error code: 401" if kind == "rejected key" else "connection: Connection error"
    assert first.status_code == 200 and first.json()["rewards"] == first.json()["extra_logs"]["pm_reward"]
    assert degraded["status"] == "degraded" and degraded["reason"].startswith(reason) and degraded["failed_batches"] == 1
    assert second.status_code == 503 and second.json()["error"].startswith(
        f"the judge failed every routed pair in 2 consecutive batches (max_consecutive_errors=1): {reason}")
    assert "\n" not in second.json()["error"]
    assert failing["status"] == "failing" and failing["failed_batches"] == 2
    assert stats["judge_failing"] == 1 and stats["errors"] == 0 and stats["billed"] == 0 + 6 * (kind == "rejected key")
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "max_consecutive_errors=1" in errors[0].getMessage() and not errors[0].exc_info
