"""Runs through a judge server that fails 30% of the time: everything finishes, nothing is NaN, failures are
counted, and a rerun pays no successful call twice."""

import json
import math
import random

import torch
from loopback import Loopback, longer_is_better

from lit_route.callbacks import UncertaintyRouting
from lit_route.data import load_pairs
from lit_route.eval.run import evaluate
from lit_route.judges import CallPolicy
from lit_route.judges.anthropic_judge import AnthropicJudge
from lit_route.judges.openai_judge import OpenAICompatibleJudge

# A client timeout no healthy answer reaches on a loaded machine (2 s; 0.3 s was tripped by slow healthy answers under
# load, which the server then billed as answers the client had given up on), and injected timeouts that hold their
# answer well past it (TIMEOUT_DELAY_S): only the injected ones time out.
POLICY = dict(max_attempts=8, timeout_s=2.0, backoff_base_s=0.01, backoff_max_s=0.1, deadline_s=60, max_concurrency=8)
TIMEOUT_DELAY_S = 3.0
def write_scores(path, pairs, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for p in pairs:
            fh.write(json.dumps({"id": p.id, "score": rng.uniform(-1, 1), "uncertainty": 1 + rng.random()}) + "\n")


def test_evaluate_with_30_percent_faults(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    data = ["bundled:llmbar/Adversarial-GPTOut.json"]
    pairs = load_pairs(data)
    write_scores(tmp_path / "scores.jsonl", pairs)
    cache = str(tmp_path / "cache.sqlite")
    with Loopback(fault_rate=0.3, seed=1, timeout_delay_s=TIMEOUT_DELAY_S, answer=longer_is_better) as server:
        judge = OpenAICompatibleJudge("m", base_url=f"{server.url}/v1", policy=CallPolicy(**POLICY))
        results = evaluate(data, judge, scores=str(tmp_path / "scores.jsonl"), output_dir=str(tmp_path / "a"),
                           order="both", cache=cache)
        first_requests = len(server.requests)
        injected = sum(server.injected.values())
    assert injected >= 10 and len(server.injected) >= 5
    assert results["n_pairs"] == 47
    values = [v for curve in results["curves"].values() for v in curve] + [results["pm_accuracy"], results["judge_accuracy"]]
    assert all(math.isfinite(v) for v in values)
    stats = results["judge_stats"]
    assert stats["retries"] >= 5 and stats["verdicts"] == 94
    # every request the server saw is counted (plus any sent on a connection the server had just dropped)
    assert first_requests <= stats["requests"] <= first_requests + server.injected.get("reset", 0)
    # billed = answers that came back; an answer the client had given up on was billed by the server only
    assert 0 <= server.completions - stats["billed"] <= server.injected.get("timeout", 0)
    failed_calls = stats["failed"]
    # a rerun against a healthy server pays only for what failed before
    with Loopback(answer=longer_is_better, port=server.server.server_address[1]) as healthy:
        judge = OpenAICompatibleJudge("m", base_url=f"{healthy.url}/v1", policy=CallPolicy(**POLICY))
        again = evaluate(data, judge, scores=str(tmp_path / "scores.jsonl"), output_dir=str(tmp_path / "b"),
                         order="both", cache=cache)
        assert len(healthy.requests) == failed_calls
    assert again["judge_failed_pairs"] == 0 and again["judge_stats"]["cached"] == 94 - failed_calls
    assert first_requests > 94


def test_rloo_with_30_percent_faults_has_no_nan(tmp_path, monkeypatch):
    from test_rloo import build

    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    with Loopback(fault_rate=0.3, seed=2, timeout_delay_s=TIMEOUT_DELAY_S, answer=longer_is_better) as server:
        judge = AnthropicJudge(model="claude-test", base_url=server.url, policy=CallPolicy(**{**POLICY, "max_attempts": 2}))
        cb = UncertaintyRouting(judge, fraction=1.0)
        module, _ = build(tmp_path, [cb], max_steps=3)
        injected = sum(server.injected.values())
    assert injected > 0
    assert all(math.isfinite(v) for v in module.last_step.values())
    assert all(torch.isfinite(p).all() for p in module.policy.parameters())
    assert cb.pairs_routed == 18 and judge.stats.retries > 0
    assert sum(cb.failures.values()) == cb.ledger.failures
