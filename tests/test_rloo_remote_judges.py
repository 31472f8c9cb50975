"""Remote judges across many RLOO steps, through the real SDKs, against a keep-alive loopback server."""

import pytest
from loopback import Loopback, longer_is_better

from lit_route.callbacks import UncertaintyRouting
from lit_route.judges import CallPolicy
from lit_route.judges.anthropic_judge import AnthropicJudge
from lit_route.judges.openai_judge import OpenAICompatibleJudge

POLICY = dict(max_attempts=3, timeout_s=5.0, backoff_base_s=0.01, backoff_max_s=0.1, deadline_s=30)


def make(kind, url, monkeypatch):
    if kind == "openai":
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        return OpenAICompatibleJudge("judge", base_url=f"{url}/v1", policy=CallPolicy(**POLICY))
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    return AnthropicJudge("claude-test", base_url=url, policy=CallPolicy(**POLICY))


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
def test_every_routed_pair_is_judged_and_billed_once_over_ten_steps(kind, tmp_path, monkeypatch):
    from test_rloo import build

    with Loopback(answer=longer_is_better) as server:
        judge = make(kind, server.url, monkeypatch)
        cb = UncertaintyRouting(judge, fraction=0.5)
        build(tmp_path, [cb], max_steps=10)
        requests = len(server.requests)
    # 10 steps x 2 prompts x 3 pairs, half routed, one display order each
    assert cb.pairs_routed == 30
    assert not cb.failures, dict(cb.failures)
    assert requests == 30 == cb.ledger.calls  # what the server saw is what the run was charged
