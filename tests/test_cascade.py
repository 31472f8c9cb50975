"""The judge cascade: exact bands, each judge charged for its own pairs, strategies on hand-built data."""

import json

import pytest
import torch

from lit_route.eval.cascade import cascade_report, escalation_curve, pareto_frontier
from lit_route.routing.cascade import cascade_bands


def test_bands_are_exact_and_follow_the_priority():
    u = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.3, 0.8, 0.2, 0.6, 0.4, 0.0])
    band = cascade_bands(u, [0.2, 0.3])
    # top 2 (0.9, 0.8) to the strong judge, next 3 (0.7, 0.6, 0.5) to the cheap one, the rest to the PM
    assert band.tolist() == [-1, 0, 1, 1, -1, 0, -1, 1, -1, -1]
    with pytest.raises(ValueError, match="cascade"):
        cascade_bands(u, [0.7, 0.5])


def test_each_judge_is_charged_for_its_band_and_escalations():
    n = 4
    order = torch.arange(n)  # pair 0 most uncertain
    pm = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    strong = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    cheap = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    strong_cost = torch.full((n,), 10.0, dtype=torch.float64)
    cheap_cost = torch.full((n,), 1.0, dtype=torch.float64)
    unsure = torch.tensor([False, True, False, True])
    esc = escalation_curve(order, pm, strong, cheap, strong_cost, cheap_cost, unsure, [0.0, 0.5, 1.0])
    # half: cheap on pairs 0-1 ($2), pair 1 escalates ($10); both right -> 4/4
    assert esc["cost"] == [0.0, 12.0, 24.0] and esc["accuracy"] == [0.5, 1.0, 1.0]
    report = cascade_report(order, -order.double(), pm, strong, cheap, strong_cost, cheap_cost, unsure,
                            [0.0, 0.5, 1.0], budgets_share=(0.5,))
    assert report["strong_all_cost_usd"] == 40.0
    row = report["at_budget"]["0.5"]  # $20: strong on 2 pairs -> 1.0; escalation reaches 1.0 for $12
    assert row["strong_only"] == 1.0 and row["escalate"] == 1.0 and row["cheap_only"] == 0.75


def test_pareto_frontier_keeps_only_undominated_points():
    pts = [{"cost": 0, "accuracy": 0.5}, {"cost": 1, "accuracy": 0.6}, {"cost": 2, "accuracy": 0.55},
           {"cost": 3, "accuracy": 0.7}]
    assert [p["cost"] for p in pareto_frontier(pts)] == [0, 1, 3]


def test_evaluate_with_a_cheap_judge_reports_cost_curves_and_exports_labels(tmp_path):
    from lit_route.cli import main
    from lit_route.data import load_pairs

    pairs = load_pairs("bundled:llmbar/Natural.json", limit=40)
    scores = tmp_path / "s.jsonl"
    scores.write_text("".join(json.dumps({"id": p.id, "score": 0.2 - (i % 3) * 0.2, "uncertainty": 1 + i / 40}) + "\n"
                              for i, p in enumerate(pairs)))
    out, exported = tmp_path / "e", tmp_path / "judged.jsonl"
    main(["evaluate", "--config", "configs/eval/llmbar_cascade.yaml", "--pm_ckpt", "null", "--scores", str(scores),
          "--data", "[bundled:llmbar/Natural.json]", "--limit_per_file", "40", "--output_dir", str(out),
          "--export_judged", str(exported), "--export_fraction", "0.5", "--progress", "false"])
    results = json.loads((out / "results.json").read_text())
    cas = results["cascade"]
    assert cas["cheap_judge"] == "ChatGPT" and (out / "cost_curve.png").exists()
    # strong alone on every pair costs what the judge stats say was paid for its verdicts
    assert cas["strong_only"]["cost"][-1] == pytest.approx(results["judge_stats"]["cost_usd"], rel=1e-4)
    assert cas["cheap_only"]["cost"][-1] < cas["strong_only"]["cost"][-1] / 10  # ChatGPT's prices
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert 0 < len(rows) == results["exported_pairs"] <= 20  # decisive verdicts among the top half
    assert {"prompt", "chosen", "rejected", "id", "source"} <= set(rows[0]) and rows[0]["source"] == "GPT-4"
    assert load_pairs(str(exported))  # the export reads back as preference pairs


def test_bidirectional_entropy_by_hand():
    from lit_route.eval.cascade import bidirectional_entropy
    from lit_route.judges.pairwise import PairJudgement
    from lit_route.types import Preference, Verdict

    def pair(*verdicts):
        return PairJudgement(1.0, verdicts=verdicts)

    a, b, tie = Verdict(Preference.A), Verdict(Preference.B), Verdict(Preference.TIE)
    # x first: A; x second: B; both say x (p is kept 1e-12 inside (0, 1), so H is ~4e-11, not 0)
    assert bidirectional_entropy(pair(a, b)) == pytest.approx(0.0, abs=1e-9)
    assert bidirectional_entropy(pair(a, a)) == pytest.approx(1.0)  # position bias: the orders contradict
    # one order sure, the other a tie: p = (1 + 0.5)/2 = 0.75, H = −0.75·log2 0.75 − 0.25·log2 0.25 = 0.8113
    assert bidirectional_entropy(pair(a, tie)) == pytest.approx(0.811278, abs=1e-6)
    # log-prob judges: P(A) 0.9 shown first, P(A) 0.3 shown second → p = (0.9 + 0.7)/2 = 0.8, H = 0.7219
    assert bidirectional_entropy(pair(Verdict(Preference.A, prob_a=0.9), Verdict(Preference.B, prob_a=0.3))) == \
        pytest.approx(0.721928, abs=1e-6)
    assert bidirectional_entropy(pair(Verdict(None, failure="timeout"))) == 1.0


def test_evaluate_escalates_the_cheap_judges_unsure_verdicts_at_a_controlled_risk(tmp_path):
    from lit_route.cli import main
    from lit_route.data import load_pairs

    pairs = load_pairs("bundled:llmbar/Natural.json")
    scores = tmp_path / "s.jsonl"
    scores.write_text("".join(json.dumps({"id": p.id, "score": 0.2 - (i % 3) * 0.2, "uncertainty": 1 + i / 40}) + "\n"
                              for i, p in enumerate(pairs)))
    out = tmp_path / "e"
    main(["evaluate", "--config", "configs/eval/llmbar_cascade.yaml", "--pm_ckpt", "null", "--scores", str(scores),
          "--data", "[bundled:llmbar/Natural.json]", "--output_dir", str(out), "--progress", "false",
          "--risk_alpha", "0.3", "--risk_splits", "20", "--n_boot", "50"])
    esc = json.loads((out / "results.json").read_text())["cascade"]["risk_escalation"]
    assert esc["splits"] == 20 and esc["alpha"] == 0.3 and 0.0 <= esc["judged_fraction"] <= 1.0
    assert esc["ranked_by"].startswith("bidirectional preference entropy")
    assert "escalated to" in (out / "results.md").read_text()
