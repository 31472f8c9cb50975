"""The routing decision as a plain object, the audit estimate under caps, and fresh draws per sampled batch."""

import math
import random
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from lit_route.callbacks import UncertaintyRouting
from lit_route.judges import FunctionJudge, run_sync
from lit_route.policy.context import RewardContext
from lit_route.rewards.pairwise import upper_pairs


class TruthJudge:
    """Answers from a table of which response is truly better (consistent in both display orders)."""

    def __init__(self):
        self.better: dict[tuple[str, str, str], str] = {}

    def __call__(self, prompt, a, b):
        return "A" if self.better[prompt, a, b] == a else "B"


def batch(rng: random.Random, step: int, truth: TruthJudge, groups=8, k=4):
    """A batch whose judge disagrees with the PM far more often on uncertain pairs: agreement 0.95 at the lowest ū,
    0.35 at the highest, so a sample tilted towards routed pairs reads a much lower agreement."""
    d = torch.zeros(groups, k, k)
    u = torch.zeros(groups, k, k)
    expected = 0.0
    ii, jj = upper_pairs(k)
    for g in range(groups):
        for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
            dij, uij = rng.gauss(0, 1), rng.random()
            d[g, i, j], d[g, j, i] = dij, -dij
            u[g, i, j] = u[g, j, i] = 1 + uij
            agree = 0.95 - 0.6 * uij
            expected += agree
            pm_says_i = dij > 0
            judge_says_i = pm_says_i if rng.random() < agree else not pm_says_i
            x, y = f"s{step}g{g}r{i}", f"s{step}g{g}r{j}"
            winner = x if judge_says_i else y
            truth.better[f"p{step}g{g}", x, y] = truth.better[f"p{step}g{g}", y, x] = winner
    prompts = [[{"role": "user", "content": f"p{step}g{g}"}] for g in range(groups)]
    completions = [[f"s{step}g{g}r{i}" for i in range(k)] for g in range(groups)]
    ctx = RewardContext(prompts, completions, d.clone(), u, d.clone(), torch.zeros_like(d, dtype=torch.bool))
    return ctx, expected


@pytest.mark.parametrize("cap,order", [(None, "random"), (8, "random"), (12, "random"), (24, "both")])
def test_audit_agreement_stays_within_its_standard_error_when_a_cap_binds(cap, order):
    """48 pairs per step, 12 routed (25%), 10 audited (20%). Caps of 8 and 12 pairs (12 = the routed count; 24
    calls = 12 pairs in both orders) used to drop only the audit pairs the router had not chosen, so the audit
    leaned to uncertain pairs: agreement read far below the truth. The estimate must sit within 3 standard errors
    of the true agreement over the pairs seen (3 SE: a fixed-seed draw, a 0.3% two-sided miss for an unbiased
    estimate; the old bias was over 10 SE)."""
    truth = TruthJudge()
    cb = UncertaintyRouting(FunctionJudge(truth, max_concurrency=64), fraction=0.25, audit_fraction=0.2, order=order,
                            max_calls_per_step=cap, seed=3)
    rng, module = random.Random(0), SimpleNamespace(device=torch.device("cpu"), hparams={})
    expected = seen = 0.0
    for step in range(40):
        ctx, agree = batch(rng, step, truth)
        expected, seen = expected + agree, seen + 48
        trainer = SimpleNamespace(world_size=1, global_step=step, global_rank=0, strategy=None)
        cb.on_pairwise_scores(trainer, module, ctx)
        cb.on_before_rewards(trainer, module, ctx)
    metrics = cb.audit.metrics()
    true_agreement = expected / seen
    n = metrics["audit/pairs"]
    se = math.sqrt(true_agreement * (1 - true_agreement) / n)
    assert abs(metrics["audit/agreement"] - true_agreement) < 3 * se, (metrics, true_agreement, se)
    assert n >= 40 * min(10, (cap or 99) // (2 if order == "both" else 1)) * 0.9
    if cap is not None:  # the cap still holds: billed calls per step never exceed it
        assert cb.ledger.calls <= 40 * cap


def test_routing_decision_runs_without_a_trainer():
    """What a reward function or a reward server does: route, ask the judge, merge into S."""
    from lit_route.routing.decision import RoutingDecision

    truth = TruthJudge()
    decision = RoutingDecision(FunctionJudge(truth), fraction=0.5, audit_fraction=0.25, seed=1)
    ctx, _ = batch(random.Random(1), 0, truth, groups=2, k=3)
    ii, jj = upper_pairs(3)
    assignment = decision.route(ctx.pm_scores[:, ii, jj], ctx.uncertainty[:, ii, jj], key=0)
    assert int(assignment.routed.sum()) == 3 and int(assignment.audit.sum()) == 2
    plan = decision.plan(assignment, list(zip(ii.tolist(), jj.tolist(), strict=True)), ctx.prompts, ctx.completions)
    result = run_sync(decision.ask(plan, seed=0))
    metrics = decision.merge(plan, result, ctx.scores, ctx.pm_scores, ctx.judged)
    judged = int((assignment.assign >= 0).sum())
    assert metrics["judge/routed_pairs"] == judged and decision.ledger.calls == judged
    assert int(ctx.judged.sum()) == 2 * judged and torch.equal(ctx.scores, -ctx.scores.transpose(1, 2))
    assert set(ctx.scores[ctx.judged].abs().tolist()) == {2.0}


class DrawRecorder(UncertaintyRouting):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.draws: list[list[bool]] = []
        self.completions: list[list[list[str]]] = []

    def _route(self, trainer, module, d_pairs, u_pairs):
        assign, routed, audit = super()._route(trainer, module, d_pairs, u_pairs)
        self.draws.append((routed | audit).flatten().tolist())
        return assign, routed, audit

    def on_pairwise_scores(self, trainer, module, ctx):
        self.completions.append(ctx.completions)
        super().on_pairwise_scores(trainer, module, ctx)


def test_accumulated_batches_each_draw_their_own_samples_and_routes(tmp_path):
    """With ``accumulate_batches: 2`` both batches of a step used the step's sampling seed and routing draws: the
    same prompt gave the same completions and the random router chose the same positions."""
    from lit_route.models.backbone import BackboneSpec, LoraSpec
    from lit_route.policy.data import PromptDataModule
    from lit_route.policy.module import RLOOPolicyModule
    from lit_route.policy.sampling import GenerationConfig

    L.seed_everything(0)
    module = RLOOPolicyModule(policy=BackboneSpec(), lora=LoraSpec(r=2, alpha=4), pm_backbone=BackboneSpec(),
                              generation=GenerationConfig(num_samples=4, max_new_tokens=6), accumulate_batches=2)
    prompts = tmp_path / "prompts.txt"
    # distinct prompts that the policy sees as the same tokens (kept: the last 8, "...Assistant:")
    prompts.write_text("\n".join(f"Say something about {i}." for i in range(8)))
    truth = SimpleNamespace(fn=lambda p, a, b: "A")
    cb = DrawRecorder(judge=FunctionJudge(truth.fn), router="random", fraction=0.3, audit_fraction=0.2)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[cb],
                        default_root_dir=tmp_path)
    trainer.fit(module, PromptDataModule(prompts=str(prompts), batch_size=2, max_prompt_tokens=8))
    assert len(cb.draws) == 4
    for a, b in ((0, 1), (2, 3)):  # the two batches of each optimiser step
        assert cb.completions[a] != cb.completions[b]
        assert cb.draws[a] != cb.draws[b]
    assert cb.state_dict()["batches"] == 4


def test_a_risk_controller_learns_from_every_audited_pair():
    """The risk controller calibrates τ on audited pairs: each one the main judge decides reaches its ``observe``
    with ū and the PM–judge agreement, and its mean loss is the audit's disagreement (the same pairs, so the two
    agree to float rounding). With a window larger than the run and a low ``min_calibration`` the risk test sets τ."""
    from lit_route.routing import RiskController

    truth = TruthJudge()
    risk = RiskController(alpha=0.3, delta=0.1, window=10_000, min_calibration=20)
    cb = UncertaintyRouting(FunctionJudge(truth, max_concurrency=64), controller=risk, audit_fraction=0.25, seed=1)
    rng, module = random.Random(1), SimpleNamespace(device=torch.device("cpu"), hparams={})
    for step in range(12):
        ctx, _ = batch(rng, step, truth)
        trainer = SimpleNamespace(world_size=1, global_step=step, global_rank=0, strategy=None)
        cb.on_pairwise_scores(trainer, module, ctx)
        cb.on_before_rewards(trainer, module, ctx)
    metrics = cb.audit.metrics()
    assert len(risk.u_cal) == metrics["audit/pairs"] == 12 * 12
    assert all(1.0 <= u <= 2.0 for u in risk.u_cal)  # the batches' ū lie in [1, 2)
    assert abs((1 - sum(risk.loss_cal) / len(risk.loss_cal)) - metrics["audit/agreement"]) < 1e-9
    assert risk.last is not None  # τ came from the risk test once calibration pairs were in


def test_a_plan_within_a_number_of_calls_keeps_keys_kinds_and_each_judges_items_aligned():
    from lit_route.routing.plan import JudgePlan

    keys = [(0, 0, 1), (0, 0, 2), (0, 1, 2)]  # two pairs for the main judge, then one for cascade stage 1
    plan = JudgePlan(keys, {k: (True, False, 0 if k != (0, 1, 2) else 1) for k in keys},
                     [[("p", "a", "b"), ("p", "a", "c")], [("p", "b", "c")]])
    one, spare = plan.within(1, 1)
    assert one.keys == keys[:1] and one.items == [[("p", "a", "b")], []] and set(one.kinds) == {keys[0]} and spare == 0
    three, spare = plan.within(4, 1)
    assert three.keys == keys and three.items == plan.items and three.kinds == plan.kinds and spare == 1
    both, spare = plan.within(3, 2)  # both display orders: 3 calls pay for one pair and leave one re-ask
    assert both.keys == keys[:1] and spare == 1
    assert plan.within(-1, 1)[0].items == [[], []]
