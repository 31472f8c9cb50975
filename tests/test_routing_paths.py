"""One routing decision on every path: the Lightning callback, TRL's reward function and the reward server give the
same routing, ledger, controller and audit for the same stream of batches; caps hold with re-asks on each path;
the audit stays a uniform sample of the pairs left to the PM when a cap binds."""

import json
import math
import urllib.request
from types import SimpleNamespace

import pytest
import torch
from loopback import Loopback, Reply

from lit_route.callbacks import UncertaintyRouting
from lit_route.integrations.routed import RoutedRewards, build_decision
from lit_route.integrations.server import RewardServer
from lit_route.integrations.trl import RoutedRewardFunction
from lit_route.judges import CallPolicy
from lit_route.judges.function import FunctionJudge
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.policy.context import RewardContext
from lit_route.routing.budget import BudgetLedger
from lit_route.routing.decision import RoutingDecision
from lit_route.routing.risk import RiskController

B, K, STEPS = 2, 4, 14


def longer_wins(prompt, a, b):
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"


def stream():
    """STEPS batches of B prompts with K completions each, and the PM's (S, U) for every group (seeded)."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for t in range(STEPS):
        prompts = [f"prompt {t}-{b}" for b in range(B)]
        completions = [[f"answer {'x' * int(n)}" for n in torch.randint(0, 30, (K,), generator=g)] for _ in prompts]
        upper = torch.randn(B, K, K, generator=g).triu(1)
        s = upper - upper.transpose(1, 2)
        spread = torch.rand(B, K, K, generator=g).triu(1) + 0.5
        u = spread + spread.transpose(1, 2)
        batches.append((prompts, completions, s, u))
    return batches


class Scripted(RoutedRewards):
    """The PM's scores of the stream, looked up by prompt (the PM itself is not what is compared here)."""

    def __init__(self, decision, table):
        super().__init__(pm=None, encoder=None, decision=decision)
        self.table = table

    def pm_scores(self, prompts, completions):
        rows = [self.table[p if isinstance(p, str) else p[0]["content"]] for p in prompts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


SETTINGS = dict(router="uncertainty", fraction=0.25, audit_fraction=0.5, max_calls_total=60, order="random", seed=5)


def controller():
    return RiskController(alpha=0.3, delta=0.2, min_calibration=8, window=64)


def run_callback(batches):
    routing = {k: v for k, v in SETTINGS.items() if k not in ("max_calls_total",)}
    cb = UncertaintyRouting(FunctionJudge(longer_wins), max_calls_total=SETTINGS["max_calls_total"],
                            controller=controller(), **routing)
    module = SimpleNamespace(device=torch.device("cpu"), hparams={})
    rewards = []
    for t, (prompts, completions, s, u) in enumerate(batches):
        trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=t)
        ctx = RewardContext(prompts, completions, s.clone(), u.clone(), s.clone(), torch.zeros_like(s, dtype=torch.bool))
        cb.on_pairwise_scores(trainer, module, ctx)
        cb.on_before_rewards(trainer, module, ctx)
        rewards.append(ctx.scores.mean(-1) * K / (K - 1))  # r_i = (1/(K−1)) Σ_j S_ij
    return cb.decision, torch.stack(rewards)


def scripted(batches):
    table = {p: (s[b], u[b]) for prompts, _, s, u in batches for b, p in enumerate(prompts)}
    decision = build_decision(FunctionJudge(longer_wins), controller=controller(), **SETTINGS)
    return Scripted(decision, table)


def run_trl(batches):
    function = RoutedRewardFunction(scripted(batches), num_generations=K)
    rewards = []
    for t, (prompts, completions, _, _) in enumerate(batches):
        flat_prompts = [p for p in prompts for _ in range(K)]
        flat = [c for group in completions for c in group]
        rewards.append(torch.tensor(function(flat_prompts, flat, trainer_state=SimpleNamespace(global_step=t))))
    return function.rewards.decision, torch.stack(rewards).view(len(batches), B, K)


def run_server(batches):
    rewards_obj = scripted(batches)
    rewards = []
    with RewardServer(rewards_obj, port=0) as server:
        for prompts, completions, _, _ in batches:
            body = {"query": [p + c for p, group in zip(prompts, completions, strict=True) for c in group],
                    "prompts": [p for p in prompts for _ in range(K)]}
            request = urllib.request.Request(f"{server.url}/get_reward", json.dumps(body).encode(),
                                             {"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as answer:
                rewards.append(torch.tensor(json.loads(answer.read())["rewards"]))
    return rewards_obj.decision, torch.stack(rewards).view(len(batches), B, K)


def test_one_stream_through_the_callback_trl_and_the_server_gives_one_state():
    """The same decision with the same feedback on every path: τ of the risk controller (which learns from the
    audit), its calibration pairs, the audit's sums and verdict, the ledger and the rewards agree."""
    batches = stream()
    runs = {"callback": run_callback(batches), "trl": run_trl(batches), "server": run_server(batches)}
    reference, ref_rewards = runs["callback"]
    assert len(reference.controller.u_cal) >= 8  # the controller learned (and moved τ by the risk test)
    assert reference.audit.totals["pool_n"] == STEPS * B * K * (K - 1) / 2
    assert reference.audit.totals["lab_n"] > 0
    for name, (decision, rewards) in runs.items():
        # the same floats in the same order on every path: any difference is a different decision, not rounding
        assert decision.controller.tau == reference.controller.tau, name
        assert decision.controller.u_cal == reference.controller.u_cal, name
        assert decision.controller.loss_cal == reference.controller.loss_cal, name
        assert decision.audit.totals == pytest.approx(reference.audit.totals, rel=1e-12), name
        assert decision.audit.verdict() == reference.audit.verdict(), name
        assert decision.ledger.state_dict() == reference.ledger.state_dict(), name
        assert (decision.pairs_seen, decision.pairs_routed) == (reference.pairs_seen, reference.pairs_routed), name
        assert torch.allclose(rewards.double(), ref_rewards.double(), atol=1e-5), name  # float32 means of ±2 logits


def unusable_first():
    """A judge whose first answer to every request has no verdict; asked again, it answers."""
    seen: set[str] = set()

    def answer(body):
        text = body["messages"][-1]["content"]
        if text in seen:
            return Reply("<verdict>A</verdict>")
        seen.add(text)
        return Reply("I would rather not say.")

    return answer


def remote_rewards(url, **caps):
    judge = OpenAICompatibleJudge("judge", base_url=f"{url}/v1",
                                  policy=CallPolicy(max_attempts=2, backoff_base_s=0.0, unparseable_retries=1))
    decision = build_decision(judge, fraction=1.0, order="fixed", **caps)
    g = torch.Generator().manual_seed(0)
    table = {}
    for name, k in (("a", 3), ("b", 3), ("c", 2)):
        upper = torch.randn(k, k, generator=g).triu(1)
        table[name] = (upper - upper.T, torch.ones(k, k))
    return Scripted(decision, table)


@pytest.mark.parametrize("caps, batches, most", [({"max_calls_per_step": 3}, 1, 3), ({"max_calls_total": 4}, 2, 4)])
def test_reasks_of_the_reward_function_stay_within_the_caps(monkeypatch, caps, batches, most):
    """TRL's reward function and the server share RoutedRewards: a re-ask after an unusable answer is a billed
    call and counts against the per-step and the run's cap."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with Loopback(answer=unusable_first()) as server:
        rewards = remote_rewards(server.url, **caps)
        for _ in range(batches):
            rewards.score(["a", "b"], [["x", "yy", "zzz"], ["u", "vv", "www"]])
        assert server.completions <= most
        assert rewards.decision.ledger.calls == server.completions


def test_the_per_step_cap_is_one_cap_per_call_across_group_sizes(monkeypatch):
    """One call with groups of two sizes is one step: the per-step cap is not granted once per size."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with Loopback(default=Reply("<verdict>A</verdict>")) as server:
        rewards = remote_rewards(server.url, max_calls_per_step=2)
        out = rewards.score(["a", "c"], [["x", "yy", "zzz"], ["u", "vv"]])
        assert server.completions == rewards.decision.ledger.calls == 2
        assert out.stats["judge/routed_pairs"] == 2


def test_audited_pairs_left_to_the_pm_are_uniform_by_router_rank_when_a_cap_binds():
    """3000 batches of 12 pairs, half routed, a quarter audited, at most 8 calls a step (the cap binds every time):
    among the pairs the router left to the PM, every rank of the router's order is audited at the same rate
    (the audit's estimates of the pairs left to the PM are then unbiased), and no batch passes the cap."""
    decision = RoutingDecision(FunctionJudge(longer_wins), fraction=0.5, audit_fraction=0.25,
                               ledger=BudgetLedger(max_calls_per_step=8), seed=0)
    left = torch.zeros(12)
    audited = torch.zeros(12)
    g = torch.Generator().manual_seed(1)
    for key in range(3000):
        u, d = torch.rand(12, generator=g), torch.randn(12, generator=g)
        a = decision.route(d, u, key)
        assert int((a.assign >= 0).sum()) <= 8
        order = torch.argsort(u, descending=True)
        kept = ~a.routed[order]
        left += kept.double()
        audited += (kept & a.audit[order]).double()
    ranks = left > 100  # every rank the router leaves to the PM in more than a few batches
    rates = audited[ranks] / left[ranks]
    pooled = float(audited[ranks].sum() / left[ranks].sum())
    # binomial standard errors per rank; 4.5 of them bounds 12 ranks at a family-wise level far below 1e-3
    se = torch.sqrt(pooled * (1 - pooled) / left[ranks])
    assert pooled == pytest.approx(0.25, abs=0.01)
    assert bool(((rates - pooled).abs() <= 4.5 * se).all()), rates.tolist()


def test_a_spend_cap_holds_with_batches_in_flight():
    """Batches routed before any is charged (a reward pipeline, a busy server) hold their estimated spend: at
    $1 a call and a $5 cap, no more than five calls are ever asked for, however many batches are in flight."""
    decision = RoutingDecision(FunctionJudge(longer_wins), fraction=0.5, ledger=BudgetLedger(max_spend_usd=5.0))
    d, u = torch.randn(2, 3), torch.rand(2, 3)
    first = decision.route(d, u, 0)
    decision.reserve(first)
    assert int((first.assign >= 0).sum()) == 3  # the price is not known yet: one batch finds it out
    second = decision.route(d, u, 1)
    decision.reserve(second)
    assert int((second.assign >= 0).sum()) == 0  # and only one batch at a time while it is unknown
    decision.prices.observe(0, 3.0, 3)  # the first batch's answers: $1 a call
    decision.release(first.hold)
    decision.ledger.charge(3, 3.0)
    third = decision.route(d, u, 2)
    decision.reserve(third)
    assert int((third.assign >= 0).sum()) == 2 and third.hold.usd == pytest.approx(2.0)
    fourth = decision.route(d, u, 3)
    assert int((fourth.assign >= 0).sum()) == 0  # $3 charged + $2 held = the cap
    assert math.isclose(decision.reserved_usd, 2.0)


def test_a_rejected_key_stops_the_callback_and_the_reward_function(monkeypatch):
    """A judge that answers 401 to every request leaves every routed pair to the PM: after
    ``max_consecutive_errors`` such steps both paths stop with one line naming the provider's answer, instead of
    training on PM rewards alone without a word."""
    from lit_route.routing.health import JudgeFailing

    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong")
    batches = stream()
    with Loopback(default=Reply(status=401)) as server:
        judge = OpenAICompatibleJudge("judge", base_url=f"{server.url}/v1", policy=CallPolicy(max_attempts=3))
        cb = UncertaintyRouting(judge, fraction=0.5, max_consecutive_errors=1)
        module = SimpleNamespace(device=torch.device("cpu"), hparams={})
        with pytest.raises(JudgeFailing, match=r"failed every routed pair in 2 consecutive steps .*401"):
            for t, (prompts, completions, s, u) in enumerate(batches):
                trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=t)
                ctx = RewardContext(prompts, completions, s.clone(), u, s.clone(), torch.zeros_like(s, dtype=torch.bool))
                cb.on_pairwise_scores(trainer, module, ctx)
                cb.on_before_rewards(trainer, module, ctx)
        assert t == 1 and cb.health.status()["status"] == "failing"
        rewards = scripted(batches)
        rewards.decision.judge, rewards.health.limit = judge, 1
        with pytest.raises(JudgeFailing, match=r"2 consecutive batches"):
            for prompts, completions, _, _ in batches:
                rewards.score(prompts, completions)
    assert server.completions == 0  # a 401 is not retried and not billed
