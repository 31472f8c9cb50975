"""`lit-route serve`: OpenRLHF-shaped requests from real HTTP clients, many at once, judged by a keep-alive
loopback server through the real OpenAI SDK."""

import asyncio
import json
import math
import threading

import pytest
import requests
import torch
from loopback import Loopback, Reply, longer_is_better

from lit_route.integrations.routed import RoutedRewards, build_decision
from lit_route.integrations.server import RewardServer, serve
from lit_route.judges import CallPolicy
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.models.backbone import BackboneSpec
from lit_route.policy.pm_scoring import load_reward_pm, score_groups
from lit_route.rewards.pairwise import pairwise_rewards

K = 4
EOS = "<|im_end|>"
POLICY = CallPolicy(max_attempts=2, timeout_s=5, backoff_base_s=0.01, backoff_max_s=0.05, deadline_s=20)


@pytest.fixture(scope="module")
def tiny_pm():
    torch.manual_seed(0)
    return load_reward_pm(None, BackboneSpec())


def rollout(prompt_id: int) -> tuple[str, list[str]]:
    """A templated prompt and K responses of different lengths (the loopback judge prefers the longer one)."""
    prompt = f"<|im_start|>user\nCount to {prompt_id}.<|im_end|>\n<|im_start|>assistant\n"
    return prompt, [" ".join(str(n) for n in range(prompt_id + k)) for k in range(K)]


def batch_body(prompt_ids) -> dict:
    """OpenRLHF <= 0.9.0: one request per rollout batch, the samples of a prompt one after another."""
    queries, prompts = [], []
    for pid in prompt_ids:
        prompt, responses = rollout(pid)
        queries += [prompt + r + EOS for r in responses]
        prompts += [prompt] * K
    return {"query": queries, "prompts": prompts, "labels": [""] * len(queries)}


def test_concurrent_openrlhf_clients_lose_no_verdict(tiny_pm, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    pm, encoder = tiny_pm
    with Loopback(answer=longer_is_better) as judge_server:
        judge = OpenAICompatibleJudge("m", base_url=f"{judge_server.url}/v1", policy=POLICY)
        rewards = RoutedRewards(pm, encoder, build_decision(judge, fraction=0.5, order="both"))
        with RewardServer(rewards, port=0, group_size=K, strip=(EOS,)) as server:
            url = f"{server.url}/get_reward"
            assert requests.get(f"{server.url}/health", timeout=5).json() == {"status": "ok"}
            answers: dict = {}

            def batch_worker(worker: int):  # `requests`, as OpenRLHF's remote_rm_fn did, one session per worker
                with requests.Session() as session:
                    for r in range(2):
                        ids = [100 * worker + 10 * r + i for i in range(2)]
                        answers[tuple(ids)] = session.post(url, json=batch_body(ids), timeout=60).json()

            async def per_sample(pid: int):  # aiohttp, as OpenRLHF 0.9.1+ does: each sample its own request
                import aiohttp

                prompt, responses = rollout(pid)
                async with aiohttp.ClientSession() as session:
                    async def one(resp):
                        body = {"query": [prompt + resp + EOS], "prompts": [prompt], "labels": [None]}
                        async with session.post(url, json=body) as answer:
                            return (await answer.json())["rewards"][0]
                    answers[pid] = await asyncio.gather(*(one(r) for r in responses))

            threads = [threading.Thread(target=batch_worker, args=(w,)) for w in range(3)]
            threads += [threading.Thread(target=asyncio.run, args=(per_sample(pid),)) for pid in (7, 8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            stats = requests.get(f"{server.url}/stats", timeout=5).json()
    groups = 3 * 2 * 2 + 2
    assert len(answers) == 3 * 2 + 2 and stats["scored_groups"] == groups and stats["requests"] == 6 + 2 * K
    judged_pairs = 0
    for key, answer in answers.items():
        if isinstance(key, tuple):
            rs = answer["rewards"]
            assert len(rs) == len(answer["scores"]) == 2 * K and all(math.isfinite(r) for r in rs)
            for g in range(2):  # S antisymmetric: a group's rewards sum to zero
                assert abs(sum(rs[g * K : (g + 1) * K])) < 1e-5
            judged_pairs += sum(answer["extra_logs"]["judged_pairs"]) // 2
        else:
            assert len(answer) == K and abs(sum(answer)) < 1e-5
    # every routed pair came back with a verdict in S; two calls per pair (order: both), each billed once
    assert stats["pairs_routed"] == stats["pairs_seen"] // 2 == groups * 3 and stats["routed_share"] == 0.5
    assert judged_pairs == 6 * 2 * 3  # the batch requests' part (the per-sample answers carry it one by one)
    assert judge_server.completions == stats["billed"] == judge.stats.billed == 2 * stats["pairs_routed"]
    assert stats["failed_pairs"] == 0 and stats["errors"] == 0 and stats["short_groups"] == 0


def test_per_sample_rewards_equal_lit_routes_group_rewards(tiny_pm):
    """Without a judge the reward of each sample is r_i = mean_j S_ij of its group, S from the PM."""
    pm, encoder = tiny_pm
    prompt, responses = rollout(3)
    with RewardServer(RoutedRewards(pm, encoder), port=0, group_size=K, strip=(EOS,)) as server:
        out = [None] * K

        def one(k):
            body = {"query": [prompt + responses[k] + EOS + "\n"], "prompts": [prompt]}
            out[k] = requests.post(server.url, json=body, timeout=60).json()["rewards"][0]

        threads = [threading.Thread(target=one, args=(k,)) for k in range(K)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    # the ChatML prompt reaches the PM as its messages, rendered by the PM's own template
    s, _ = score_groups(pm, encoder, [[{"role": "user", "content": "Count to 3."}]], [responses])
    # group order follows arrival, so the PM's batches differ: float32 rounding (~1e-7) is allowed, not more; the
    # untrained PM's rewards are ~1e-5, and reading the template as text would move them by ~3e-5
    assert out == pytest.approx(pairwise_rewards(s)[0].tolist(), abs=2e-6)


def test_a_failing_judge_keeps_the_pm_reward_and_bad_requests_get_400(tiny_pm, monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    pm, encoder = tiny_pm
    with Loopback(default=Reply(status=500)) as judge_server:
        judge = OpenAICompatibleJudge("m", base_url=f"{judge_server.url}/v1", policy=POLICY)
        rewards = RoutedRewards(pm, encoder, build_decision(judge, fraction=1.0))
        state = tmp_path / "state.json"
        with RewardServer(rewards, port=0, state_file=str(state)) as server:
            answer = requests.post(server.url, json=batch_body([1, 2]), timeout=60).json()
            bad = requests.post(server.url, data=b"{not json", timeout=5)
            missing = requests.post(server.url, json={"query": ["a"]}, timeout=5)
            stats = requests.get(f"{server.url}/stats", timeout=5).json()
    assert answer["rewards"] == answer["extra_logs"]["pm_reward"]  # the PM's reward, not 0, not NaN
    assert all(math.isfinite(r) for r in answer["rewards"]) and any(r != 0 for r in answer["rewards"])
    assert sum(answer["extra_logs"]["judged_pairs"]) == 0
    assert stats["failed_pairs"] == 2 * 6 and stats["billed"] == 0 == judge_server.completions
    assert bad.status_code == 400 and bad.json()["error"].startswith("body: not JSON")
    assert missing.status_code == 400 and missing.json()["error"] == "prompts: expected a list of strings"
    saved = json.loads(state.read_text())
    assert saved["decision"]["ledger"]["failures"] == 12 and saved["batches"] == 1


def test_serve_config_starts_a_server_and_keeps_its_budget(tmp_path):
    from lit_route.integrations.server import serve_cli  # noqa: F401  (the CLI entry imports)

    state = tmp_path / "state.json"
    server = serve(pm_backbone=BackboneSpec(), port=0, state_file=str(state), run=False)
    try:
        answer = requests.post(server.url, json=batch_body([5]), timeout=60).json()
        assert len(answer["rewards"]) == K
    finally:
        server.close()


def test_concurrent_batches_never_overspend_the_run_cap(tiny_pm):
    """Six batches routed at once, 6 calls asked by each, 10 allowed: the calls in flight are reserved, so
    exactly 10 are made (without the reservation every batch would see the full allowance and make 36)."""
    import time

    from lit_route.judges.function import FunctionJudge

    def slow_longer(prompt, a, b):
        time.sleep(0.5)  # keeps every batch's calls in flight while the others are routed
        return "A" if len(a) >= len(b) else "B"

    pm, encoder = tiny_pm
    judge = FunctionJudge(slow_longer)
    rewards = RoutedRewards(pm, encoder, build_decision(judge, fraction=0.5, max_calls_total=10))
    with RewardServer(rewards, port=0, strip=(EOS,)) as server:
        barrier = threading.Barrier(6)

        def post(w):
            barrier.wait()
            assert requests.post(server.url, json=batch_body([10 * w, 10 * w + 1]), timeout=60).status_code == 200

        threads = [threading.Thread(target=post, args=(w,)) for w in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        stats = server.stats()
    assert judge.stats.billed == stats["billed"] == 10 and stats["in_flight_calls"] == 0


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    from lit_route.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--pm_ckpt", str(tmp_path / "missing.ckpt")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lit-route: error: pm_ckpt: {tmp_path / 'missing.ckpt'} does not exist; train a PM first")
    assert err.endswith("(--debug shows the traceback)") and "\n" not in err
    config = tmp_path / "serve.yaml"
    config.write_text("pm_ckpt: never_loaded.ckpt\njudge:\n  class_path: lit_route.judges.FunctionJudge\n"
                      "  init_args:\n    function: json:dumps\nfraction: 1.5\n")
    with pytest.raises(SystemExit):
        main(["serve", "--config", str(config)])
    assert capsys.readouterr().err.startswith("lit-route: error: fraction: expected a number in [0, 1]; got 1.5")
    with RewardServer(RoutedRewards(None, None), port=0) as taken, pytest.raises(ValueError, match="port: cannot listen"):
        RewardServer(RoutedRewards(None, None), port=int(taken.url.rsplit(":", 1)[1]))


def test_serve_options_are_refused_in_one_line_naming_them(monkeypatch, capsys):
    from lit_route.cli import main

    def never(self):
        raise AssertionError("lit-route serve started serving")

    monkeypatch.setattr(RewardServer, "serve_forever", never)
    monkeypatch.delenv("LIT_ROUTE_SERVE_TOKEN", raising=False)
    for args, line in [
        (["--port", "70000"], "port: expected an integer in 0..65535; got 70000"),
        (["--group_wait_s", "-5"], "group_wait_s: expected a number >= 0; got -5"),
        (["--strip", "5"], "strip: expected a list of end-of-turn strings, e.g. --strip '[\"<|im_end|>\"]'"),
        (["--group_size", "100"], "group_size: expected an integer in 2..64 (max_group_size) or null; got 100"),
        (["--host", "0.0.0.0"], "host: 0.0.0.0 can be reached from other machines and $LIT_ROUTE_SERVE_TOKEN is "
                                "not set"),
    ]:
        with pytest.raises(SystemExit):
            main(["serve", "--pm_backbone.model_path", "builtin:tiny-llama", *args])
        err = capsys.readouterr().err
        assert err.startswith(f"lit-route: error: {line}") and err.count("\n") == 1, err


def test_a_request_names_its_group_size_for_an_evaluation_round(tiny_pm):
    """OpenRLHF's evaluation sends --eval.n_samples_per_prompt samples per prompt (4 by default), training
    --rollout.n_samples_per_prompt: a client posting its evaluation samples to ``?group_size=2`` has its groups
    scored when they are complete, not after the wait for a training-sized group."""
    pm, encoder = tiny_pm
    prompt, responses = rollout(4)
    with RewardServer(RoutedRewards(pm, encoder), port=0, group_size=K, group_wait_s=600, strip=(EOS,)) as server:
        out: list = [None] * 2

        def one(k):
            body = {"query": [prompt + responses[k] + EOS], "prompts": [prompt]}
            out[k] = requests.post(f"{server.url}/get_reward?group_size=2", json=body, timeout=120).json()

        threads = [threading.Thread(target=one, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        bad = requests.post(f"{server.url}/get_reward?group_size=1", json=batch_body([1]), timeout=30)
        stats = server.stats()
    s, _ = score_groups(pm, encoder, [[{"role": "user", "content": "Count to 4."}]], [responses[:2]])
    # arrival order decides the PM's batch: float32 rounding (~1e-7) only, as in the test above
    assert [o["rewards"][0] for o in out] == pytest.approx(pairwise_rewards(s)[0].tolist(), abs=2e-6)
    assert stats["scored_groups"] == 1 and stats["short_groups"] == 0
    assert bad.status_code == 400 and bad.json()["error"] == ("group_size: expected an integer in 2..64 (samples "
                                                              "per prompt); got '1'")


def serve_main(monkeypatch, args: list[str]) -> tuple[RewardServer, threading.Thread]:
    """`lit-route serve ARGS` through the CLI's main in a thread; its server once it listens. Shut it down with
    ``server.httpd.shutdown()`` (what Ctrl-C does to serve_forever: main then saves the state and returns)."""
    from lit_route.cli import main

    started: list = []
    serve_forever = RewardServer.serve_forever

    def record(self):
        started.append(self)
        serve_forever(self)

    monkeypatch.setattr(RewardServer, "serve_forever", record)
    thread = threading.Thread(target=main, args=(["serve", *args],), daemon=True)
    thread.start()
    for _ in range(600):
        if started:
            break
        thread.join(timeout=0.1)
    assert started, "lit-route serve did not start listening"
    return started[0], thread


def test_lit_route_serve_with_the_shipped_debug_config(tmp_path, monkeypatch):
    """The user's path, in-process: `lit-route serve --config configs/serve/debug_tiny.yaml` through the CLI's
    main, a request, /stats, shutdown; the budget spent is in the state file afterwards."""
    from pathlib import Path

    state = tmp_path / "state.json"
    config = Path(__file__).resolve().parents[1] / "configs" / "serve" / "debug_tiny.yaml"
    server, thread = serve_main(monkeypatch, ["--config", str(config), "--port", "0", "--state_file", str(state)])
    body = {"query": ["Hi! a", "Hi! bb", "Hi! ccc", "Hi! dddd"], "prompts": ["Hi!"] * 4}
    rewards = requests.post(f"{server.url}/get_reward", json=body, timeout=120).json()["rewards"]
    # the config's group size: the same samples, a request each (as OpenRLHF 0.9.1+ sends them), are one group
    one_each = [None] * 4

    def post_one(k):
        one = {"query": [body["query"][k]], "prompts": ["Hi!"]}
        one_each[k] = requests.post(f"{server.url}/get_reward", json=one, timeout=120).json()["rewards"][0]

    threads = [threading.Thread(target=post_one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stats = requests.get(f"{server.url}/stats", timeout=5).json()
    server.httpd.shutdown()  # what Ctrl-C does to serve_forever; main then saves the state and returns
    thread.join(timeout=30)
    assert len(rewards) == 4 and abs(sum(rewards)) < 1e-5 and not thread.is_alive()
    assert abs(sum(one_each)) < 1e-5 and any(r != 0 for r in one_each)  # pairwise rewards, not lone samples' 0
    assert stats["scored_groups"] == 2 and stats["singletons"] == 0 and stats["short_groups"] == 0
    assert stats["pairs_seen"] == 12 and stats["pairs_routed"] == 4 and stats["billed"] == 4  # 25% of 6 pairs, twice
    assert json.loads(state.read_text())["decision"]["ledger"]["calls"] == 4


def test_calls_billed_before_a_kill_are_charged_on_restart(tiny_pm, monkeypatch, tmp_path):
    """A server killed after its judge calls returned but before it saved its state: the restarted server's
    ledger still equals what the judge server billed (the journal beside the state file holds those calls)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    pm, encoder = tiny_pm
    state = tmp_path / "state.json"

    def start(judge_url):
        judge = OpenAICompatibleJudge("m", base_url=f"{judge_url}/v1", policy=POLICY)
        return RewardServer(RoutedRewards(pm, encoder, build_decision(judge, fraction=1.0, order="fixed")), port=0,
                            strip=(EOS,), state_file=str(state))

    with Loopback(answer=longer_is_better) as judge_server:
        with start(judge_server.url) as first:
            requests.post(first.url, json=batch_body([1]), timeout=60)
            on_disk = state.read_text()  # the state a kill during the next request leaves behind
            requests.post(first.url, json=batch_body([2]), timeout=60)
        state.write_text(on_disk)
        assert judge_server.completions == 12  # two groups of 4: 6 pairs each, one call per pair
        with start(judge_server.url) as restarted:
            assert restarted.stats()["billed"] == 12  # 6 from the saved state + 6 from the journal
            requests.post(restarted.url, json=batch_body([3]), timeout=60)
            stats = restarted.stats()
    assert stats["billed"] == judge_server.completions == 18 and stats["batches"] == 3
    assert json.loads(state.read_text())["decision"]["ledger"]["calls"] == 18


def test_serve_config_with_a_cascade_counts_each_judges_band(tmp_path, monkeypatch):
    """`lit-route serve --config` with a cascade stage below the main judge, as the routing callback takes one:
    the top 25% of the pairs go to the main judge, the next 50% to the cheaper one, and /stats and the state file
    count each band (before, `cascade` was not an option of `serve`)."""
    import textwrap

    from lit_route.routing import count_for_fraction

    (tmp_path / "bands.py").write_text(textwrap.dedent('''
        def longer(prompt, a, b):
            return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"

        def shorter(prompt, a, b):
            return "B" if len(a) > len(b) else "A" if len(b) > len(a) else "tie"
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    config = tmp_path / "serve.yaml"
    config.write_text(textwrap.dedent(f'''
        pm_backbone:
          model_path: builtin:tiny-llama
        judge:
          class_path: lit_route.judges.FunctionJudge
          init_args: {{function: "bands:longer"}}
        fraction: 0.25
        order: fixed
        cascade:
          - judge:
              class_path: lit_route.judges.FunctionJudge
              init_args: {{function: "bands:shorter"}}
            fraction: 0.5
            cache: {tmp_path / "cheap.sqlite"}
        port: 0
        state_file: {tmp_path / "state.json"}
    '''))
    server, thread = serve_main(monkeypatch, ["--config", str(config)])
    body = {"query": ["Hi! a", "Hi! bb", "Hi! ccc", "Hi! dddd"], "prompts": ["Hi!"] * 4}
    answer = requests.post(f"{server.url}/get_reward", json=body, timeout=120).json()
    stats = requests.get(f"{server.url}/stats", timeout=5).json()
    server.httpd.shutdown()
    thread.join(timeout=30)
    top = count_for_fraction(6, 0.25)
    band = count_for_fraction(6, 0.75) - top
    assert stats["judged_by"] == [top, band] and top > 0 and band > 0
    assert stats["billed"] == top + band and sum(answer["extra_logs"]["judged_pairs"]) == 2 * (top + band)
    assert json.loads((tmp_path / "state.json").read_text())["judged_by"] == [top, band]
