"""The routing callback's decisions, budgets, failures and option checks."""

from types import SimpleNamespace

import pytest
import torch

from lit_route.callbacks import UncertaintyRouting
from lit_route.judges import HFLocalJudge, JudgeStats
from lit_route.judges.limits import CallPolicy


def tiny_judge():
    return HFLocalJudge(model_path="builtin:tiny-llama", gguf_file=None, max_prompt_tokens=256, tie_margin=-1.0)


class RaisingJudge:
    """A judge whose backend breaks (a local model error, a locked cache): ``judge`` raises."""

    name, model = "raising", "none"

    def __init__(self):
        self.stats = JudgeStats()

    async def judge(self, requests):
        raise RuntimeError("database is locked")


def trainer(world=1, step=0, rank=0, strategy=None):
    return SimpleNamespace(world_size=world, global_step=step, global_rank=rank, strategy=strategy)


D = torch.tensor([[0.1, -2.0, 0.5], [3.0, 0.05, -0.2]])
U = torch.tensor([[1.0, 1.5, 1.2], [1.1, 1.05, 3.0]])


def route(cb, **kw):
    _assign, routed, _audit = cb._route(trainer(**kw), SimpleNamespace(device=torch.device("cpu")), D, U)
    return routed


def test_uncertainty_margin_and_random_route_the_same_number_of_pairs():
    unc = route(UncertaintyRouting(tiny_judge(), fraction=0.5))
    assert sorted(U[unc].tolist()) == pytest.approx([1.2, 1.5, 3.0])  # the three highest ū
    margin = route(UncertaintyRouting(tiny_judge(), router="margin", fraction=0.5))
    assert sorted(D[margin].abs().tolist()) == pytest.approx([0.05, 0.1, 0.2])  # the three smallest |d|
    draws = [route(UncertaintyRouting(tiny_judge(), router="random", fraction=0.5, seed=s), step=t)
             for s in range(3) for t in range(3)]
    assert all(int(m.sum()) == 3 for m in draws)
    assert len({tuple(m.flatten().tolist()) for m in draws}) > 1  # not a fixed subset
    # the same seed and step give the same draw (every DDP rank must agree)
    a = route(UncertaintyRouting(tiny_judge(), router="random", fraction=0.5, seed=7), step=4)
    b = route(UncertaintyRouting(tiny_judge(), router="random", fraction=0.5, seed=7), step=4)
    assert torch.equal(a, b)


def test_random_router_with_a_threshold_judges_as_many_pairs_as_the_threshold_selects():
    by_threshold = route(UncertaintyRouting(tiny_judge(), threshold=1.15))
    random = route(UncertaintyRouting(tiny_judge(), router="random", threshold=1.15))
    assert int(by_threshold.sum()) == int(random.sum()) == 3


def test_collectives_get_tensors_on_the_module_device():
    """NCCL cannot gather CPU tensors: what reaches all_gather must live on the module's device."""
    seen = []

    def all_gather(t):
        seen.append(t.device)
        local = torch.stack([D, U])
        return torch.stack([local, local])

    cb = UncertaintyRouting(tiny_judge(), fraction=0.5)
    module = SimpleNamespace(device=torch.device("meta"))
    _, mask, _ = cb._route(trainer(world=2, rank=1, strategy=SimpleNamespace(all_gather=all_gather)), module, D, U)
    assert seen == [torch.device("meta")]
    assert mask.shape == D.shape and int(mask.sum()) <= 6


@pytest.mark.parametrize("option,value,match", [
    ({"max_calls_per_step": -1}, None, "max_calls_per_step"),
    ({"max_calls_total": -5}, None, "max_calls_total"),
    ({"max_spend_usd": -1.0}, None, "max_spend_usd"),
    ({"fraction": 1.5}, None, "fraction"),
    ({"fraction": -0.1}, None, "fraction"),
    ({"order": "sideways"}, None, "order"),
    ({"router": "oracle"}, None, "router"),
    ({"router": "margin", "threshold": 1.2}, None, "threshold"),
    ({"verdict_logit": 0.0}, None, "verdict_logit"),
])
def test_bad_options_fail_at_construction_naming_the_option(option, value, match):
    with pytest.raises(ValueError, match=f"^{match}"):
        UncertaintyRouting(tiny_judge(), **option)


@pytest.mark.parametrize("policy,match", [
    ({"max_concurrency": 0}, "policy.max_concurrency"),
    ({"max_attempts": 0}, "policy.max_attempts"),
    ({"unparseable_retries": -1}, "policy.unparseable_retries"),
    ({"requests_per_minute": 0}, "policy.requests_per_minute"),
    ({"timeout_s": -1}, "policy.timeout_s"),
])
def test_bad_call_policy_fails_naming_the_option(policy, match):
    with pytest.raises(ValueError, match=f"^{match}"):
        CallPolicy(**policy)


def test_a_judge_that_raises_keeps_pm_scores_and_the_run_goes_on(tmp_path):
    from test_rloo import build, lora_state

    cb = UncertaintyRouting(RaisingJudge(), fraction=0.5)
    routed, _ = build(tmp_path, [cb], max_steps=3)
    assert cb.failures == {"error:RuntimeError": 9} and cb.ledger.calls == 0 and cb.ledger.failures == 9
    plain, _ = build(tmp_path, max_steps=3)
    a, b = lora_state(plain), lora_state(routed)
    assert all(torch.equal(a[k], b[k]) for k in a)  # rewards were the PM's alone: the same run as PM-only


def test_a_judge_that_keeps_raising_stops_the_run(tmp_path):
    from test_rloo import build

    cb = UncertaintyRouting(RaisingJudge(), fraction=0.5, max_consecutive_errors=1)
    with pytest.raises(RuntimeError, match="consecutive"):
        build(tmp_path, [cb], max_steps=3)


def test_both_display_orders_cost_two_billed_calls_per_pair_under_the_cap(tmp_path):
    from test_rloo import build

    cb = UncertaintyRouting(tiny_judge(), fraction=0.5, order="both", max_calls_total=10)
    build(tmp_path, [cb], max_steps=3)
    # step 1: 3 pairs x 2 calls; step 2: 4 calls left -> 2 pairs; step 3: none
    assert cb.ledger.calls == 10 and cb.pairs_routed == 5


def test_local_judge_loads_a_plain_model_folder_without_naming_a_file(tiny_model_dir):
    from lit_route.judges import run_sync
    from lit_route.types import JudgeRequest

    judge = HFLocalJudge(model_path=str(tiny_model_dir), max_prompt_tokens=128)
    (verdict,) = run_sync(judge.judge([JudgeRequest("q", "a", "b")]))
    assert verdict.ok and verdict.billed == 1


def test_controller_and_audit_from_yaml_log_their_state_and_resume(tmp_path, caplog):
    import csv
    import logging

    from lit_route.cli import main

    root = tmp_path / "run"
    args = ["rloo", "fit", "--config", "configs/rloo/debug_tiny_budget.yaml", "--trainer.default_root_dir", str(root),
            "--trainer.enable_progress_bar", "false"]
    with caplog.at_level(logging.INFO):
        main([*args, "--trainer.max_steps", "4"])
    # the run ends with the audit's verdict on routing (or why it has none yet)
    assert any(r.getMessage().startswith("routing audit: ") for r in caplog.records)
    (metrics,) = root.rglob("metrics.csv")
    rows = [r for r in csv.DictReader(metrics.read_text().splitlines()) if r.get("judge/tau")]
    assert len(rows) == 4 and all(float(r["judge/target_fraction"]) == 0.25 for r in rows)
    assert any(r.get("audit/agreement") for r in rows) and all("cascade/judged_by_1" in r for r in rows)
    assert any(r.get("audit/gain_lo") and r.get("audit/gain_hi") for r in rows)  # the PPI estimate with its interval
    (ckpt,) = root.rglob("last.ckpt")  # every RLOO run keeps checkpoints/last.ckpt
    state = torch.load(ckpt, weights_only=False)
    routing = next(v for k, v in state["callbacks"].items() if "UncertaintyRouting" in k)
    assert routing["controller"]["tau"] is not None and routing["audit"]["audit_n"] > 0
    main([*args, "--trainer.max_steps", "6", "--ckpt_path", str(ckpt)])
    # the resumed run's own last.ckpt (in the next log version)
    state = torch.load(max(root.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime_ns), weights_only=False)
    resumed = next(v for k, v in state["callbacks"].items() if "UncertaintyRouting" in k)
    assert resumed["audit"]["audit_n"] > routing["audit"]["audit_n"]  # the tally went on from the saved one


def test_cascade_sends_the_next_band_to_the_cheaper_judge_and_charges_both(tmp_path):
    from test_rloo import build

    from lit_route.callbacks.routing import CascadeStage

    strong, cheap = tiny_judge(), tiny_judge()
    cb = UncertaintyRouting(strong, fraction=1 / 6, cascade=[CascadeStage(cheap, fraction=2 / 6)])
    module, _ = build(tmp_path, [cb], max_steps=2)
    # 6 pairs a step: 1 to the strong judge, the next 2 by ū to the cheap one; one billed call each
    assert strong.stats.billed == 2 and cheap.stats.billed == 4
    assert cb.ledger.calls == 6 and cb.pairs_routed == 6
    assert module.last_step["cascade/judged_by_0"] == 1 and module.last_step["cascade/judged_by_1"] == 2
    assert module.last_step["judge/fraction"] == 0.5
    assign, _, _ = cb._route(trainer(), SimpleNamespace(device=torch.device("cpu")), D, U)
    assert sorted(U[assign == 0].tolist()) == pytest.approx([3.0])
    assert sorted(U[assign == 1].tolist()) == pytest.approx([1.2, 1.5])  # the next two by ū


def test_rloo_exports_judged_pairs_that_pm_fit_trains_on(tmp_path, tiny_model_dir):
    from test_rloo import build

    from lit_route.cli import main
    from lit_route.data import load_pairs

    exported = tmp_path / "judged.jsonl"
    cb = UncertaintyRouting(tiny_judge(), fraction=0.5, export_judged=str(exported))
    build(tmp_path, [cb], max_steps=3)
    pairs = load_pairs(str(exported))
    assert len(pairs) == 9  # 3 steps x 3 routed pairs, every verdict decisive (tie_margin -1)
    assert all(p.subset == "rloo" and p.prompt for p in pairs)
    root = tmp_path / "pm"
    main(["pm", "fit", "--config", "configs/pm/debug_tiny.yaml", "--data.train", f"[{exported}]",
          "--data.val_fraction", "0", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(root),
          "--model.backbone.model_path", str(tiny_model_dir), "--trainer.enable_progress_bar", "false"])
    assert (root / "finalized.ckpt").exists()
    # a second round continues from the first PM on the same labels, and refinalises
    again = tmp_path / "pm2"
    main(["pm", "fit", "--config", "configs/pm/debug_tiny.yaml", "--data.train", f"[{exported}]",
          "--data.val_fraction", "0", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(again),
          "--model.backbone.model_path", str(tiny_model_dir), "--trainer.enable_progress_bar", "false",
          "--continue_from.pm_ckpt", str(root / "finalized.ckpt")])
    assert (again / "finalized.ckpt").exists()


def test_continue_from_loads_the_trained_adapters_and_head(tmp_path, tiny_model_dir):
    from lit_route.callbacks.continue_from import ContinueFrom
    from lit_route.cli import main
    from lit_route.models.backbone import BackboneSpec, LoraSpec
    from lit_route.preference import PreferenceModule, SNGPConfig

    root = tmp_path / "pm"
    main(["pm", "fit", "--config", "configs/pm/debug_tiny.yaml", "--data.limit_per_file", "8", "--trainer.max_epochs",
          "1", "--trainer.default_root_dir", str(root), "--model.backbone.model_path", str(tiny_model_dir),
          "--model.lora.r", "4", "--trainer.enable_progress_bar", "false"])
    saved = torch.load(root / "finalized.ckpt", weights_only=False)["state_dict"]
    fresh = PreferenceModule(backbone=BackboneSpec(model_path=str(tiny_model_dir)), lora=LoraSpec(r=4),
                             sngp=SNGPConfig(num_features=128))
    lora_key = next(k for k in saved if "lora_B" in k)
    assert not torch.equal(fresh.state_dict()[lora_key], saved[lora_key])  # LoRA B starts at zero
    ContinueFrom(str(root / "finalized.ckpt")).setup(None, fresh, "fit")
    now = fresh.state_dict()
    assert all(torch.equal(now[k], v) for k, v in saved.items())
    other = PreferenceModule(backbone=BackboneSpec(model_path="builtin:tiny-llama"), lora=LoraSpec(r=4))
    with pytest.raises(ValueError, match=r"continue_from\.pm_ckpt: trained on"):
        ContinueFrom(str(root / "finalized.ckpt")).setup(None, other, "fit")
