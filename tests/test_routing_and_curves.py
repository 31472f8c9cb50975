import json

import pytest
import torch

from lit_route.eval.curves import (
    area_under_curve,
    curve_for_order,
    margin_order,
    random_expected_curve,
    routed_accuracy,
    uncertainty_order,
)
from lit_route.judges import ReplayJudge, judge_pairs, run_sync
from lit_route.routing import (
    BudgetLedger,
    BudgetRouter,
    MarginRouter,
    OracleRouter,
    RandomRouter,
    ThresholdRouter,
    count_for_fraction,
    threshold_for_fraction,
)
from lit_route.types import JudgeRequest, Preference

D = torch.tensor([0.9, -0.2, 0.05, 1.5, -0.01, 0.3])
U = torch.tensor([1.01, 1.30, 1.20, 1.00, 1.25, 1.10])


def test_routers_hold_the_budget_exactly():
    for f in (0.0, 0.17, 0.5, 0.99, 1.0):
        k = count_for_fraction(6, f)
        for router in (BudgetRouter(f), MarginRouter(f), OracleRouter(f), RandomRouter(f, seed=1)):
            assert int(router.route(D, U).sum()) == k
    assert BudgetRouter(0.5).route(D, U).tolist() == [False, True, True, False, True, False]
    assert MarginRouter(0.34).route(D, U).tolist() == [False, False, True, False, True, False]
    assert OracleRouter(0.34).route(D, U).tolist() == [False, True, False, False, True, False]
    assert RandomRouter(count=4, seed=3).route(D, U).sum() == 4


def test_threshold_router_matches_fraction():
    tau = threshold_for_fraction(U, 0.5)
    assert torch.equal(ThresholdRouter(tau).route(D, U), BudgetRouter(0.5).route(D, U))
    big = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert int(ThresholdRouter(threshold_for_fraction(big, 0.1)).route(big, big).sum()) == 100


def test_router_shapes_are_kept():
    d, u = torch.randn(2, 3, 3), torch.rand(2, 3, 3)
    assert BudgetRouter(0.5).route(d, u).shape == (2, 3, 3)


def test_curve_arithmetic_on_a_hand_built_example():
    # 4 pairs: PM right on 0 and 1; judge right on 1, 2 and a tie on 3
    pm = torch.tensor([1.0, 1.0, 0.0, 0.0])
    judge = torch.tensor([0.0, 1.0, 1.0, 0.5])
    assert routed_accuracy(pm, judge, torch.tensor([False, False, True, True])) == pytest.approx(0.875)
    order = torch.tensor([2, 3, 1, 0])
    # k = 0,1,2,3,4 -> credits 2, 3, 3.5, 3.5, 2.5 over 4
    assert curve_for_order(order, pm, judge, [0, 0.25, 0.5, 0.75, 1.0]) == pytest.approx([0.5, 0.75, 0.875, 0.875, 0.625])
    # random: 0.5 + k/4 * mean(judge - pm) = 0.5 + k/4 * 0.125
    assert random_expected_curve(pm, judge, [0, 0.5, 1.0]) == pytest.approx([0.5, 0.5625, 0.625])
    assert area_under_curve([0, 0.5, 1.0], [0.5, 0.5, 0.5]) == pytest.approx(0.5)


def test_random_expected_value_matches_seeds():
    gen = torch.Generator().manual_seed(0)
    pm = (torch.rand(200, generator=gen) < 0.6).double()
    judge = (torch.rand(200, generator=gen) < 0.8).double()
    expected = random_expected_curve(pm, judge, [0.3])[0]
    draws = [routed_accuracy(pm, judge, RandomRouter(0.3, seed=s).route(pm, pm)) for s in range(400)]
    assert sum(draws) / len(draws) == pytest.approx(expected, abs=0.003)


def test_orders():
    assert uncertainty_order(U)[:2].tolist() == [1, 4]
    assert margin_order(D)[:2].tolist() == [4, 2]


def test_ledger_caps_and_state():
    ledger = BudgetLedger(max_calls_per_step=5, max_calls_total=8, max_spend_usd=1.0)
    assert ledger.allowance() == 5
    ledger.charge(5, spend_usd=0.4, failures=1)
    assert ledger.allowance() == 3
    ledger.charge(3, spend_usd=0.7)
    assert ledger.allowance() == 0
    restored = BudgetLedger(5, 8, 1.0)
    restored.load_state_dict(ledger.state_dict())
    assert restored.calls == 8 and restored.failures == 1 and restored.allowance() == 0


def test_replay_judge_matches_by_content_and_never_guesses(tmp_path):
    path = tmp_path / "v.jsonl"
    rows = [
        {"judge": "J", "prompt": "p", "response_a": "x", "response_b": "y", "winner": "A"},
        {"judge": "J", "prompt": "p", "response_a": "y", "response_b": "x", "winner": None},
        {"judge": "K", "prompt": "p", "response_a": "x", "response_b": "y", "winner": "B"},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    judge = ReplayJudge(str(path), judge="J")
    verdicts = run_sync(judge.judge([JudgeRequest("p", "x", "y"), JudgeRequest("p", "y", "x"), JudgeRequest("p", "x", "z")]))
    assert verdicts[0].preference is Preference.A
    assert verdicts[1].failure == "unparseable" and verdicts[2].failure == "no_record"
    (j,) = run_sync(judge_pairs(judge, [("p", "x", "y")], order="both"))
    assert j.score == 1.0 and not j.inconsistent  # the other order failed; the valid one decides
    with pytest.raises(ValueError, match="recorded judges"):
        ReplayJudge(str(path), judge="nobody")


def test_bundled_gpt4_verdicts_cover_llmbar():
    from lit_route.data import load_pairs

    pairs = load_pairs("bundled:llmbar/Adversarial-GPTOut.json")
    judge = ReplayJudge(judge="GPT-4")
    js = run_sync(judge_pairs(judge, [(p.prompt, p.chosen, p.rejected) for p in pairs], order="both"))
    assert all(j.score is not None for j in js)
    assert 0.5 < sum(j.score for j in js) / len(js) < 1.0
