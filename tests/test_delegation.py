"""The learned delegation router: its logistic-regression math on hand-solvable data, the model file, and the
``learned`` router of the RLHF loop's routing decision."""

import json
import math

import pytest
import torch

from lit_route.judges import FunctionJudge
from lit_route.routing.decision import RoutingDecision
from lit_route.uncertainty.delegation import (
    DelegationModel,
    delegation_signals,
    fit_delegation,
    main,
    routing_model,
)


def test_unpenalised_fit_recovers_the_error_rate_of_each_group():
    # one signal with two values; the PM is wrong on 1 of 3 pairs at x = 0 and on 2 of 3 at x = 1. The maximum-
    # likelihood logistic fit reproduces the two rates exactly: P = 1/3 and 2/3 (logits ∓ ln 2, bias 0 by symmetry)
    x = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    wrong = torch.tensor([0.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    model = fit_delegation({"abs_d": x}, wrong, ["abs_d"], l2=0.0)
    p = model.predict({"abs_d": torch.tensor([0.0, 1.0])})
    assert p.tolist() == pytest.approx([1 / 3, 2 / 3], abs=1e-9)  # L-BFGS run to a 1e-12 gradient
    # standardised input: mean 0.5, sample sd sqrt(0.3); the weight is ln 2 / (0.5 / sqrt(0.3))
    assert model.mean == pytest.approx([0.5]) and model.scale == pytest.approx([math.sqrt(0.3)])
    assert model.weights[0] == pytest.approx(math.log(2) * math.sqrt(0.3) / 0.5, abs=1e-5)
    assert model.bias == pytest.approx(0.0, abs=1e-6)
    assert model.fitted_on == {"pairs": 6, "error_rate": 0.5, "l2": 0.0}


def test_an_uninformative_signal_gets_no_weight_under_the_penalty():
    x = torch.tensor([0.0, 0.0, 1.0, 1.0])
    model = fit_delegation({"log_u": x}, torch.tensor([0.0, 1.0, 0.0, 1.0]), ["log_u"], l2=0.1)
    assert model.weights[0] == pytest.approx(0.0, abs=1e-8) and model.bias == pytest.approx(0.0, abs=1e-8)


def test_signals_are_symmetric_in_the_two_responses():
    d, u = torch.tensor([0.5, -2.0]), torch.tensor([1.0, math.e])
    s = delegation_signals(d, u, torch.tensor([3.0, 10.0]), torch.tensor([7.0, 2.0]))
    t = delegation_signals(-d, u, torch.tensor([7.0, 2.0]), torch.tensor([3.0, 10.0]))
    assert all(torch.equal(s[k], t[k]) for k in s)
    assert s["abs_d"].tolist() == [0.5, 2.0] and s["log_u"].tolist() == pytest.approx([0.0, 1.0])
    assert s["log_len_sum"].tolist() == pytest.approx([math.log(11), math.log(13)])
    assert s["log_len_diff"].tolist() == pytest.approx([math.log(5), math.log(9)])
    assert set(delegation_signals(d, u)) == {"abs_d", "log_u"}  # no texts: no surface signal


def test_the_delegation_model_on_pm_signals_learns_that_errors_fall_with_the_margin():
    g = torch.Generator().manual_seed(0)
    d, u = torch.randn(200, generator=g), 1 + torch.rand(200, generator=g)
    wrong = (torch.rand(200, generator=g) < torch.sigmoid(-3 * d.abs())).double()
    model = fit_delegation(delegation_signals(d, u), wrong, ["abs_d", "log_u"])
    assert model.weights[0] < 0  # errors fall with |d|, as drawn


def test_model_file_round_trip_and_one_line_refusals(tmp_path):
    model = DelegationModel(("abs_d", "log_len_sum"), [0.1, 4.0], [1.0, 0.5], [-1.0, 0.3], 0.2, {"pairs": 9})
    path = tmp_path / "m.json"
    model.save(path)
    back = DelegationModel.load(path)
    assert back == model and back.needs_texts
    signals = {"abs_d": torch.tensor([0.1]), "log_len_sum": torch.tensor([4.5])}
    # z = (0, 1): logit = 0.3 + 0.2
    assert float(back.predict(signals)) == pytest.approx(1 / (1 + math.exp(-0.5)))
    with pytest.raises(ValueError, match="needs the signals"):
        back.predict({"abs_d": torch.tensor([0.1])})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"signals": ["colour"], "mean": [0], "scale": [1], "weights": [1], "bias": 0}))
    with pytest.raises(ValueError, match=f"{bad} is not a delegation model file.*unknown signals"):
        DelegationModel.load(bad)
    with pytest.raises(ValueError, match="is not a delegation model file"):
        DelegationModel.load(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="uses response lengths; the routing decision sees only d and ū"):
        routing_model("learned", str(path))
    with pytest.raises(ValueError, match="needs a delegation model file"):
        routing_model("learned", None)
    assert routing_model("uncertainty", None) is None


def test_the_learned_router_judges_the_highest_p_wrong_first(tmp_path):
    path = tmp_path / "m.json"
    # P(wrong) falls with |d| and rises with ū; |d| weighs three times as much
    DelegationModel(("abs_d", "log_u"), [0.0, 0.0], [1.0, 1.0], [-3.0, 1.0], 0.0, {}).save(path)
    decision = RoutingDecision(FunctionJudge(lambda p, a, b: "A"), router="learned", fraction=0.5,
                               delegation=str(path))
    d = torch.tensor([0.1, -2.0, 0.5, 0.05])
    u = torch.tensor([1.0, math.e**4, 1.0, 1.0])
    # logits: −0.3, −2.0, −1.5, −0.15 -> the pairs 3 and 0
    assignment = decision.route(d, u, key=0)
    assert assignment.routed.tolist() == [True, False, False, True]
    with pytest.raises(ValueError, match="the learned router takes fraction"):
        RoutingDecision(FunctionJudge(lambda p, a, b: "A"), router="learned", threshold=0.5, delegation=str(path))


def test_fitting_from_a_score_file_on_the_command_line(tmp_path, capsys):
    from lit_route.data import load_pairs

    pairs = load_pairs("bundled:constraints/pairs-heldout.jsonl.gz", limit=40)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected})
                            + "\n" for p in pairs))
    scores = tmp_path / "s.jsonl"
    # the PM is wrong (d ≤ 0) on the pairs i % 4 in (0, 1): 20 of 40
    scores.write_text("".join(json.dumps({"id": p.id, "score": (i % 4) - 1.0, "uncertainty": 1.0 + (i % 3)}) + "\n"
                              for i, p in enumerate(pairs)))
    out = tmp_path / "m.json"
    main(["--scores", str(scores), "--data", str(data), "--signals", "abs_d", "log_len_sum", "--output", str(out)])
    model = DelegationModel.load(out)
    assert model.signals == ("abs_d", "log_len_sum")
    assert model.fitted_on["pairs"] == 40 and model.fitted_on["error_rate"] == 0.5
    with pytest.raises(SystemExit) as stop:
        main(["--scores", str(tmp_path / "none.jsonl"), "--data", str(data), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 1 and len(err) == 1 and "none.jsonl" in err[0]
