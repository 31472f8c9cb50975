"""``benchmarks/onpolicy_routing.py``: the counterfactual reward accuracy of each router on a run's own pairs
(checked against numbers worked out by hand), the pair log an RLOO run writes, and the block it adds to
routing_vs_length's results."""

import json
import shutil
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lit_route.tasks.verify import judge_pair
from lit_route.uncertainty.delegation import DelegationModel

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
# sums of a few float64 terms divided by small counts: exact up to rounding
TOL = 1e-12


@pytest.fixture
def onp(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import onpolicy_routing

    yield onpolicy_routing
    for name in ("onpolicy_routing", "routing_vs_length", "pm_constraints_select", "rlhf_downstream"):
        sys.modules.pop(name, None)


def step(d, u, len_i, len_j, label):
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    return {"d": t(d), "u": t(u), "len_i": t(len_i), "len_j": t(len_j), "label": torch.tensor(label)}


# Four pairs of one step. PM right on p0 only (p1: d > 0 but B passes; p3: d < 0 but A passes); p2 is a tie,
# counted in the step's pairs but not in the accuracy: 3 decided pairs, 1 right without the judge.
#        p0    p1    p2    p3
STEP = step(d=[0.5, 0.2, -0.1, -0.3], u=[0.1, 0.9, 0.8, 0.2],
            len_i=[10, 10, 5, 7], len_j=[12, 10, 5, 20],  # |a| − |b|: 2, 0, 0, 13
            label=[1, -1, 0, 1])
# judged pairs k: round(25% of 4) = 1, round(50% of 4) = 2
BY_HAND = {
    "pm_only": [1 / 3, 1 / 3],
    # p1 (wrong, now right), then p2 (a tie: nothing changes)
    "uncertainty": [2 / 3, 2 / 3],
    # smallest |d| first: p2 (tie), then p1
    "margin": [1 / 3, 2 / 3],
    # each judged pair gains the mean of (decided and wrong) over all 4 pairs, 2/4: 1 + 0.5, 1 + 1 right of 3
    "random": [1.5 / 3, 2 / 3],
    # closest lengths first: p1 and p2 tie at 0 (k = 1 takes either, expected gain (1 + 0)/2), then p0
    "length": [1.5 / 3, 2 / 3],
    # the PM's errors first: p1, p3
    "oracle": [2 / 3, 3 / 3],
}


def test_counterfactual_accuracy_of_one_step_matches_the_hand_count(onp):
    routers = list(BY_HAND)
    right, decided = onp.step_table([STEP], routers, None, "closest", fractions=(0.25, 0.5))
    assert decided.tolist() == [3.0]
    acc = onp.pooled_accuracy(right, decided)
    for r, name in enumerate(routers):
        assert acc[r].tolist() == pytest.approx(BY_HAND[name], abs=TOL), name


def test_learned_router_ranks_by_its_model_and_pools_over_steps(onp):
    # P(wrong) falling with |d| alone ranks as margin does
    model = DelegationModel(("abs_d", "log_u"), [0.0, 0.0], [1.0, 1.0], [-1.0, 0.0], 0.0, {})
    # a second step: one decided pair, PM wrong on it, three ties
    other = step(d=[-1.0, 0.3, 0.4, 0.5], u=[0.5, 0.5, 0.5, 0.5], len_i=[1, 1, 1, 1], len_j=[1, 1, 1, 1],
                 label=[1, 0, 0, 0])
    right, decided = onp.step_table([STEP, other], ["pm_only", "random", "margin", "learned_pm"], model, "closest",
                                    fractions=(0.25,))
    acc = onp.pooled_accuracy(right, decided)[:, 0]
    # pooled: (right in step 1 + right in step 2) / (3 + 1); random in step 2 gains 1/4 for its one judged pair;
    # margin and learned judge p2 (a tie) in step 1 and the smallest |d| = 0.3 (a tie) in step 2
    assert acc.tolist() == pytest.approx([(1 + 0) / 4, (1.5 + 0.25) / 4, (1 + 0) / 4, (1 + 0) / 4], abs=TOL)


def test_analysis_gives_paired_intervals_and_per_seed_points(onp):
    model = DelegationModel(("abs_d", "log_u"), [0.0, 0.0], [1.0, 1.0], [-1.0, 0.0], 0.0, {})
    runs = {"s0": [STEP, STEP], "s1": [STEP]}
    block = onp.analyse(runs, model, "closest", n_boot=50)
    assert block["n"] == {"seeds": 2, "steps": 3, "pairs": 12, "decided_pairs": 9}
    # every redraw is copies of one step: intervals collapse onto the hand numbers
    for name, (at25, _) in BY_HAND.items():
        cell = block["accuracy"][name]["25%"]
        assert cell["mid"] == pytest.approx(at25, abs=TOL) and cell["hi"] - cell["lo"] == pytest.approx(0, abs=TOL)
    assert block["minus_random"]["uncertainty"]["25%"]["mid"] == pytest.approx(2 / 3 - 0.5, abs=TOL)
    assert block["minus_length"]["uncertainty"]["25%"]["mid"] == pytest.approx(2 / 3 - 0.5, abs=TOL)
    assert block["per_run"]["s1"]["oracle"]["50%"] == pytest.approx(1.0, abs=TOL)
    head = onp.headline(block, "learned_pm")
    assert head["router"] == "learned_pm" and set(head) == {"router", "share", "n", "learned_pm", "uncertainty"}


def write_log(path: Path, steps) -> None:
    names = {1: "A", -1: "B", 0: "tie"}
    with open(path, "w") as fh:
        for b, s in enumerate(steps):
            for p in range(s["d"].numel()):
                fh.write(json.dumps({"batch": b, "step": b, "group": 0, "i": 0, "j": 1, "d": float(s["d"][p]),
                                     "u": float(s["u"][p]), "len_i": int(s["len_i"][p]), "len_j": int(s["len_j"][p]),
                                     "label": names[int(s["label"][p])]}) + "\n")


def test_main_adds_the_on_policy_block_to_the_routing_results(onp, tmp_path, capsys):
    results = tmp_path / "routing_vs_length.json"
    shutil.copy(ROOT / "benchmarks/results/routing_vs_length.json", results)
    model = DelegationModel(("abs_d", "log_u"), [0.0, 0.0], [1.0, 1.0], [-1.0, 0.0], 0.0, {})
    model.save(tmp_path / "learned_pm.json")
    logs = [tmp_path / f"s{i}.jsonl" for i in range(2)]
    for log in logs:
        write_log(log, [STEP, STEP])
    onp.main(["--pairs", *map(str, logs), "--delegation", str(tmp_path / "learned_pm.json"),
              "--results", str(results), "--n-boot", "20"])
    out = json.loads(results.read_text())
    assert out["on_policy"]["n"]["steps"] == 4 and out["on_policy"]["length_by"] == "closest"  # validation's choice
    head = out["summary"]["constraints"]["on_policy"]
    assert head["router"] == "learned_pm" and set(head["learned_pm"]["minus_random"]) == {"mid", "lo", "hi"}
    assert out["summary"]["shift"]["on_policy"] is None
    table = (tmp_path / "routing_vs_length.md").read_text()
    assert "### on policy: 16 pairs" in table and "| learned_pm |" in table.split("### on policy")[1]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(logs[0].read_text().splitlines()[0] + "\n" + '{"batch": 0, "label": "maybe"}\n')
    with pytest.raises(SystemExit) as stop:
        onp.main(["--pairs", str(bad), "--results", str(results)])
    assert stop.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: {bad}:2: not a pair record")


class ScoresSeen(L.Callback):
    """Keeps what the reward hooks saw at each batch (the PM's scores, ū, the completions, the prompts)."""

    def __init__(self):
        self.seen = []

    def on_pairwise_scores(self, trainer, module, ctx):
        self.seen.append((ctx.pm_scores.clone(), ctx.uncertainty.clone(), ctx.completions, ctx.prompts))

    def on_before_rewards(self, trainer, module, ctx):
        pass


def test_pair_log_records_every_sampled_pair_with_the_verifiers_label(onp, tmp_path):
    from lit_route.callbacks import UncertaintyRouting
    from lit_route.judges import FunctionJudge
    from lit_route.models.backbone import BackboneSpec, LoraSpec
    from lit_route.policy.data import PromptDataModule
    from lit_route.policy.module import RLOOPolicyModule
    from lit_route.policy.sampling import GenerationConfig
    from lit_route.routing.plan import prompt_text

    L.seed_everything(0)
    module = RLOOPolicyModule(policy=BackboneSpec(), lora=LoraSpec(r=4, alpha=8), pm_backbone=BackboneSpec(),
                              generation=GenerationConfig(num_samples=3, max_new_tokens=6), lr=1e-2)
    seen = ScoresSeen()
    log = onp.PairLog(str(tmp_path / "pairs.jsonl"))
    # the judge replaces half the scores: the log keeps the PM's own
    routing = UncertaintyRouting(FunctionJudge("lit_route.tasks.verify:judge_pair"), fraction=0.5, order="fixed")
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[routing, log, seen],
                        default_root_dir=str(tmp_path))
    trainer.fit(module, PromptDataModule(prompts="bundled:constraints/prompts-train.jsonl", batch_size=2, limit=8))
    rows = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 * 3  # 2 batches x 2 prompts x 3 pairs (K = 3)
    for r in rows:
        s, u, completions, prompts = seen.seen[r["batch"]]
        a, b = completions[r["group"]][r["i"]], completions[r["group"]][r["j"]]
        assert r["i"] < r["j"] and r["d"] == float(s[r["group"], r["i"], r["j"]])
        assert r["u"] == float(u[r["group"], r["i"], r["j"]]) and (r["len_i"], r["len_j"]) == (len(a), len(b))
        assert r["label"] == judge_pair(prompt_text(prompts[r["group"]]), a, b)
    steps = onp.read_steps(tmp_path / "pairs.jsonl")
    assert [s["d"].numel() for s in steps] == [6, 6]


def test_every_rlhf_downstream_arm_logs_its_pairs(onp):
    import rlhf_downstream as rd

    for arm in (*rd.ARMS, *rd.EXTRA_ARMS):
        callbacks = rd.arm_callbacks(arm, 0.25, 0, 5, "bundled:constraints/prompts-heldout.jsonl", "run/pairs.jsonl")
        logs = [c for c in callbacks if c["class_path"] == "onpolicy_routing.PairLog"]
        assert [c["init_args"]["path"] for c in logs] == ["run/pairs.jsonl"], arm
    assert all(c["class_path"] != "onpolicy_routing.PairLog" for c in rd.arm_callbacks("random", 0.25, 0, 5, "x"))
