"""Bootstrap intervals, prediction-powered estimates and risk-controlled thresholds: hand-derived cases and
coverage by simulation (seeded, so the counts are the same on every machine)."""

import math

import pytest
import torch

from lit_route.eval.curves import curve_for_order, random_expected_curve, uncertainty_order
from lit_route.eval.stats import (
    bootstrap,
    curve_at,
    expected_curve_at,
    percentile_interval,
    random_curve_at,
    resample_indices,
    risk_split_test,
    routing_intervals,
    routing_statistics,
    unpack_statistics,
)
from lit_route.preference.metrics import PreferenceMetrics
from lit_route.routing.audit import AuditTally
from lit_route.routing.ppi import PPISums, ppi_mean, routing_estimates, verdict
from lit_route.routing.risk import (
    RiskController,
    binomial_cdf,
    hb_pvalue,
    risk_threshold,
    start_pairs,
)

FRACTIONS = [i / 20 for i in range(21)]


def _pairs(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, generator=g) + 0.5
    u = -d.abs() + 0.5 * torch.randn(n, generator=g)
    judge = (torch.rand(n, generator=g) < 0.85).double()
    return d, u, judge


def test_percentile_interval_of_0_to_100_is_2_5_and_97_5():
    lo, hi = percentile_interval(torch.arange(101.0).unsqueeze(1))  # linear interpolation: 0.025·100 = 2.5
    assert float(lo) == pytest.approx(2.5) and float(hi) == pytest.approx(97.5)


def test_cluster_redraws_take_whole_clusters():
    clusters = torch.tensor([0, 0, 1, 1, 1])
    for idx in resample_indices(5, 50, seed=1, clusters=clusters):
        counts = torch.bincount(idx, minlength=5)
        assert counts[0] == counts[1] and counts[2] == counts[3] == counts[4]  # members drawn together
        assert idx.numel() in (4, 5, 6)  # two draws of a 2- or 3-pair cluster
    assert all(idx.shape == (7,) for idx in resample_indices(7, 3))


def test_statistics_match_the_curves_and_metrics_they_summarise():
    d, u, judge = _pairs()
    stats = unpack_statistics(routing_statistics(d, u, judge, FRACTIONS), len(FRACTIONS))
    pm = (d > 0).double()
    assert stats["curves"]["uncertainty"] == curve_for_order(uncertainty_order(u), pm, judge, FRACTIONS)
    assert stats["curves"]["random"] == pytest.approx(random_expected_curve(pm, judge, FRACTIONS), abs=1e-12)
    metrics = PreferenceMetrics()
    metrics.update(d, u)
    m = metrics.compute()
    assert stats["auroc_uncertainty"] == pytest.approx(m["auroc_uncertainty"], abs=1e-9)
    assert stats["ece"] == pytest.approx(m["ece"], abs=1e-5)  # float32 inside torchmetrics


def test_paired_difference_by_hand():
    # the one wrong pair is the most uncertain and the judge is always right: at 25% judged uncertainty routing is
    # perfect (1.0), random expects 0.75 + 0.25·mean(judge − PM) = 0.75 + 0.25·0.25 = 0.8125
    d = torch.tensor([-1.0, 1.0, 2.0, 3.0])
    u = torch.tensor([9.0, 1.0, 1.0, 1.0])
    stats = unpack_statistics(routing_statistics(d, u, torch.ones(4), [0.0, 0.25, 0.5]), 3)
    assert stats["difference_uncertainty_random"] == pytest.approx([0.0, 0.1875, 0.125])
    # oracle = uncertainty here: the whole (oracle − random) headroom is recovered
    assert stats["recovered_share"] == pytest.approx(1.0)


def test_ties_are_broken_at_random_in_expectation():
    # priorities 2, 1, 1, 0: the first pair, then half the gain of the tied pair each time one of them is judged
    pm = torch.tensor([0.0, 0.0, 1.0, 1.0])
    judge = torch.tensor([1.0, 1.0, 1.0, 0.0])  # gains 1, 1, 0, −1
    got = expected_curve_at(torch.tensor([2.0, 1.0, 1.0, 0.0]), pm, judge, torch.arange(5))
    assert got.tolist() == pytest.approx([0.5, 0.75, 0.875, 1.0, 0.75])
    ks = torch.arange(5)
    assert torch.allclose(expected_curve_at(torch.zeros(4), pm, judge, ks), random_curve_at(pm, judge, ks))
    distinct = torch.tensor([0.3, 0.1, 0.9, 0.5])
    assert torch.allclose(expected_curve_at(distinct, pm, judge, ks),
                          curve_at(torch.argsort(distinct, descending=True), pm, judge, ks))


def test_paired_difference_against_the_length_control_by_hand():
    # the PM is wrong on pair 0 only; uncertainty finds it first, the length control (longest first) last
    d = torch.tensor([-1.0, 1.0, 2.0, 3.0])
    u = torch.tensor([9.0, 1.0, 2.0, 3.0])
    length = torch.tensor([1.0, 4.0, 3.0, 2.0])
    stats = unpack_statistics(routing_statistics(d, u, torch.ones(4), [0.0, 0.25, 0.5], priorities={"length": length}),
                              3, ["length"])
    assert stats["curves"]["length"] == pytest.approx([0.75, 0.75, 0.75])
    assert stats["difference_vs_length"]["uncertainty"] == pytest.approx([0.0, 0.25, 0.25])
    # mean accuracy on [0, 0.5]: random (0.75, 0.8125, 0.875) 0.8125, oracle (0.75, 1, 1) 0.9375, length 0.75:
    # length recovers (0.75 − 0.8125) / 0.125 = −0.5 of the headroom, uncertainty all of it
    assert stats["recovered"]["length"] == pytest.approx(-0.5)
    assert stats["recovered"]["uncertainty"] == pytest.approx(1.0) == stats["recovered_share"]
    assert stats["recovered_vs_length"]["uncertainty"] == pytest.approx(1.5)
    iv = routing_intervals(d, u, torch.ones(4), [0.0, 0.25, 0.5], n_boot=20, priorities={"length": length})
    assert iv["priorities"] == ["length"] and iv["point"]["recovered_vs_length"]["uncertainty"] == pytest.approx(1.5)


def _coverage(data_fn, truth, clusters_fn, reps=200, n_boot=300):
    hits = 0
    for rep in range(reps):
        y = data_fn(rep)
        out = bootstrap(lambda idx, y=y: y[idx].mean(), y.numel(), n_boot, seed=rep, clusters=clusters_fn())
        hits += float(out["lo"]) <= truth <= float(out["hi"])
    return hits / reps


def test_pair_bootstrap_covers_a_bernoulli_mean():
    g = torch.Generator().manual_seed(0)
    cover = _coverage(lambda _: (torch.rand(150, generator=g) < 0.3).double(), 0.3, lambda: None)
    assert 0.90 <= cover <= 0.99  # nominal 0.95; 200 repetitions have a standard error of 0.015


def test_cluster_bootstrap_covers_where_the_pair_bootstrap_does_not():
    # 30 prompts of 10 pairs each; a pair's outcome is mostly its prompt's: pairs are not independent draws
    g = torch.Generator().manual_seed(1)
    clusters = torch.arange(300) // 10

    def data(_):
        prompt_p = torch.rand(30, generator=g)
        return (torch.rand(300, generator=g) < prompt_p[clusters]).double()

    by_prompt = _coverage(data, 0.5, lambda: clusters)
    by_pair = _coverage(data, 0.5, lambda: None)
    assert by_prompt >= 0.88 and by_pair < 0.75


def test_routing_intervals_bracket_the_point_and_name_their_unit():
    d, u, judge = _pairs(200)
    iv = routing_intervals(d, u, judge, FRACTIONS, clusters=torch.arange(200) // 4, n_boot=200)
    assert iv["resampled"] == "prompt" and iv["units"] == 50
    for name in ("uncertainty", "random"):
        for lo, p, hi in zip(iv["lo"]["curves"][name], iv["point"]["curves"][name], iv["hi"]["curves"][name], strict=True):
            assert lo <= p + 1e-12 and p <= hi + 1e-12
    assert iv["separated"][0] == 0 and iv["separated"][-1] == 0  # nothing or everything judged: no difference


# --- prediction-powered inference --------------------------------------------------------------------------------
def test_ppi_with_uninformative_predictions_is_the_audit_mean():
    y = [1, 1, 0, 1, 0, 1, 1, 1]
    s = PPISums(pool_n=1000, pool_f=700, pool_f2=490, n=8, y=sum(y), y2=sum(y), f=5.6, f2=8 * 0.49, yf=0.7 * sum(y))
    est, lo, hi = ppi_mean(s)  # f constant: var(f) = 0, λ = 0, the classical mean and standard error
    sd = math.sqrt(0.75 * 0.25 * 8 / 7)
    assert est == pytest.approx(0.75) and est - lo == pytest.approx(1.959964 * sd / math.sqrt(8), rel=1e-5)
    assert hi == 1.0  # 0.75 + 0.32: clipped to the range of an agreement rate


def test_ppi_covers_and_beats_the_audit_mean_with_good_predictions():
    g = torch.Generator().manual_seed(2)
    hits, width_ppi, width_classic = 0, 0.0, 0.0
    for _ in range(300):
        p = torch.rand(2000, generator=g) * 0.6 + 0.4  # chance of agreeing, per pair
        f = (p + 0.05 * torch.randn(2000, generator=g)).clamp(0, 1)  # the PM's (noisy) guess of it
        y = (torch.rand(2000, generator=g) < p).double()
        lab = torch.randperm(2000, generator=g)[:100]
        s = PPISums(2000, float(f.sum()), float((f * f).sum()), 100, float(y[lab].sum()), float(y[lab].sum()),
                    float(f[lab].sum()), float((f[lab] ** 2).sum()), float((y[lab] * f[lab]).sum()))
        _, lo, hi = ppi_mean(s)
        hits += lo <= float(p.mean()) <= hi
        width_ppi += hi - lo
        classic = ppi_mean(PPISums(n=100, y=s.y, y2=s.y2, f=0.0, f2=0.0, yf=0.0))
        width_classic += classic[2] - classic[1]
    # even perfect predictions of p leave the judge's coin flip: var(y − p) ≈ 0.15 against var(y) ≈ 0.18, so the
    # interval can shrink by about sqrt(0.15 / 0.18) ≈ 0.92 at best
    assert hits / 300 >= 0.9 and width_ppi < 0.95 * width_classic


def test_routing_estimates_by_hand():
    # 20 routed pairs agreeing half the time, 80 left agreeing 90%: system 0.2 + 0.8·0.9 = 0.92, PM 0.1 + 0.72 =
    # 0.82, random with 20 calls 0.2 + 0.8·0.82 = 0.856, gain 0.92 − 0.856 = 0.064 = 0.2·0.8·(0.9 − 0.5)
    est = routing_estimates(20, 10, 80, (0.9, 0.85, 0.95))
    assert est["system"] == pytest.approx((0.92, 0.88, 0.96))
    assert est["pm"] == pytest.approx((0.82, 0.78, 0.86))
    assert est["gain"] == pytest.approx((0.064, 0.056, 0.072))
    assert verdict(est["gain"]).startswith("routing pays off: +6.4 ± 0.8")
    assert verdict((0.01, -0.02, 0.04)).startswith("not distinguishable from random")


def test_audit_tally_logs_the_gain_interval_from_a_simulated_run():
    g = torch.Generator().manual_seed(3)
    tally = AuditTally()
    for _ in range(20):  # steps of 64 pairs: the PM is wrong where ū is high, the router judges the top 25%
        d = torch.randn(64, generator=g) * 2
        u = -d.abs() + 0.3 * torch.randn(64, generator=g)
        wrong = torch.rand(64, generator=g) < torch.sigmoid(-d.abs() * 2)
        judge = torch.where(wrong, (d <= 0).double(), (d > 0).double())
        routed = u >= u.quantile(0.75)
        audited = torch.rand(64, generator=g) < 0.2
        tally.observe_pool(d, routed)
        for i in (routed | audited).nonzero().flatten().tolist():
            tally.add(bool(routed[i]), bool(audited[i]), float(d[i]), float(judge[i]))
        tally.close_step(tally.step_counts())
    m = tally.metrics()
    assert m["audit/gain_lo"] <= m["audit/gain"] <= m["audit/gain_hi"]
    assert m["audit/gain_lo"] > 0 and m["audit/pays_off"] == 1.0 and tally.verdict().startswith("routing pays off")
    assert m["audit/system_agreement"] > m["audit/pm_agreement"]
    restored = AuditTally()
    restored.load_state_dict(tally.state_dict())
    assert restored.metrics() == m
    old = AuditTally()  # a checkpoint from before the PPI sums still loads, and gives no estimate
    old.load_state_dict({"routed_n": 4.0, "routed_dis": 3.0, "audit_n": 4.0, "audit_dis": 1.0})
    assert "audit/gain" not in old.metrics() and old.verdict().startswith("no verdict yet: 0 audited pairs")


# --- risk-controlled routing -------------------------------------------------------------------------------------
def test_binomial_and_hoeffding_bentkus_by_hand():
    assert binomial_cdf(1, 3, 0.5) == pytest.approx(0.5)  # (1 + 3) / 8
    assert binomial_cdf(0, 10, 0.1) == pytest.approx(0.9**10)
    # no loss in n pairs: min(exp(−n·log(1/(1−α))), e·(1−α)^n) = (1 − α)^n
    assert hb_pvalue(0.0, 30, 0.1) == pytest.approx(0.9**30)
    assert hb_pvalue(0.2, 100, 0.1) == 1.0  # above α: no evidence
    assert start_pairs(0.1, 0.1, "binomial", rate=0.0) == 22  # 0.9^22 = 0.098 ≤ 0.1 < 0.9^21


def test_risk_threshold_extremes_and_bad_options():
    u = torch.linspace(0, 1, 500)
    assert risk_threshold(u, torch.zeros(500), 0.1, 0.1).tau == pytest.approx(1.0)  # never wrong: keep them all
    assert risk_threshold(u, torch.ones(500), 0.1, 0.1).tau is None  # always wrong: judge every pair
    # wrong exactly above ū = 0.5: τ stops at or below the point where the risk of the kept pairs passes α
    choice = risk_threshold(u, (u > 0.5).double(), 0.1, 0.1)
    assert 0.5 <= choice.tau <= 0.5 / 0.9 and choice.risk_hat <= 0.1
    with pytest.raises(ValueError, match=r"^risk\.alpha"):
        risk_threshold(u, u, 1.0, 0.1)
    with pytest.raises(ValueError, match=r"^risk\.method"):
        risk_threshold(u, u, 0.1, 0.1, method="t")


@pytest.mark.parametrize("method", ["hb", "binomial"])
def test_risk_control_holds_over_200_splits_of_simulated_pairs(method):
    # P(PM and judge disagree | ū) = 0.02 + 0.4·ū² for ū uniform on [0, 1] (the judge is right): the risk left to
    # the PM below τ is 0.02 + 0.133·τ², α = 0.1 is reached at τ = 0.77. 1000 calibration pairs, 5000 test pairs
    # (a large test part, so that the realised disagreement is close to the risk the guarantee is about).
    g = torch.Generator().manual_seed(4)
    n = 6000
    u = torch.rand(n, generator=g)
    wrong = torch.rand(n, generator=g) < 0.02 + 0.4 * u * u
    d = torch.where(wrong, -1.0, 1.0)
    report = risk_split_test(d, u, torch.ones(n), alpha=0.1, delta=0.1, splits=200, calibration_share=1 / 6,
                             method=method)
    assert report["held"] >= 0.9  # the guarantee: realised disagreement ≤ α in ≥ 1 − δ of the splits
    assert report["disagreement_left"] <= 0.1 and 0.25 <= report["judged_fraction"] <= 0.6  # and it is not vacuous
    assert report["accuracy"] > report["random_accuracy_same_calls"]


def test_risk_controller_follows_the_budget_until_calibrated_then_the_risk_and_resumes():
    ctrl = RiskController(alpha=0.1, delta=0.1)
    g = torch.Generator().manual_seed(5)
    u = torch.rand(256, generator=g)
    ctrl.calibrate(u, 0.25)
    assert float((u > ctrl.threshold(u)).double().mean()) == pytest.approx(0.25, abs=0.01)
    for _ in range(10):  # audit pairs: the PM disagrees with the judge only above ū = 0.6
        audit_u = torch.rand(64, generator=g)
        ctrl.observe(audit_u, (audit_u <= 0.6).double())
        ctrl.update(torch.rand(256, generator=g), 0.25)
    assert 0.55 <= ctrl.tau <= 0.7 and ctrl.last.risk_hat <= 0.1
    clone = RiskController(alpha=0.1, delta=0.1)
    clone.load_state_dict(ctrl.state_dict())
    assert clone.tau == ctrl.tau and clone.u_cal == ctrl.u_cal
    ctrl.observe(torch.rand(5000, generator=g), torch.zeros(5000))  # the judge now disagrees everywhere
    ctrl.update(u, 0.25)
    assert ctrl.tau < float(u.min())  # no τ passes: every pair goes to the judge


def test_risk_controller_in_the_routing_callbacks_controller_slot():
    from types import SimpleNamespace

    from lit_route.callbacks import UncertaintyRouting
    from lit_route.judges import HFLocalJudge
    from lit_route.routing import RiskController

    ctrl = RiskController(alpha=0.1, delta=0.1)
    cb = UncertaintyRouting(HFLocalJudge(model_path="builtin:tiny-llama", gguf_file=None), controller=ctrl,
                            fraction=0.5)
    u = torch.linspace(0, 1, 400).view(4, 100)
    d = torch.ones_like(u)
    step = SimpleNamespace(world_size=1, global_step=0, global_rank=0, strategy=None)
    module = SimpleNamespace(device=torch.device("cpu"))
    _, routed, _ = cb._route(step, module, d, u)
    assert int(routed.sum()) == 200  # no audit pairs seen yet: the budget target (half)
    audit_u = torch.rand(2000, generator=torch.Generator().manual_seed(6))
    ctrl.observe(audit_u, (audit_u <= 0.8).double())  # what the decision code passes for the audited pairs
    for t in (1, 2):  # the callback moves τ after routing a step: the risk's τ routes the step after
        _, routed, _ = cb._route(SimpleNamespace(**{**vars(step), "global_step": t}), module, d, u)
    # now by the risk: disagreement below τ is (τ − 0.8)/τ, ≤ 0.1 up to τ = 0.89, so ~11–20% are judged
    assert 0.1 <= float(routed.double().mean()) <= 0.2


def test_paired_t_interval_and_seeds_needed_by_hand():
    from lit_route.eval.stats import paired_t_interval, seeds_needed

    # differences 1, 2, 3: mean 2, sd 1, half-width t(2)·1/√3 = 4.303/1.732 = 2.484
    iv = paired_t_interval([1.0, 2.0, 3.0])
    assert iv["mean"] == 2.0 and iv["sd"] == pytest.approx(1.0) and iv["hi"] - 2.0 == pytest.approx(2.4844, abs=1e-4)
    assert paired_t_interval([0.5])["lo"] is None
    # (1.96 + 0.8416)² · (sd/effect)² = 7.849 · 4 = 31.4 -> 32 seeds for an effect of half the spread
    assert seeds_needed(0.01, 0.02) == 32 and seeds_needed(0.0, 0.02) is None


def test_ppi_does_not_claim_certainty_when_every_audited_pair_agreed():
    # 5 audited pairs, all agreeing: the plug-in variance is 0; Agresti–Coull's (5 + 2)/(5 + 4) = 7/9 gives
    # a half-width of 1.96·sqrt(7/9 · 2/9 · 5/4)/sqrt(5) = 0.408 (clipped at 1 above)
    s = PPISums(pool_n=100, pool_f=90, pool_f2=81.5, n=5, y=5, y2=5, f=4.5, f2=4.1, yf=4.5)
    est, lo, _ = ppi_mean(s)
    assert est == pytest.approx(1.0) and lo == pytest.approx(1.0 - 1.959964 * math.sqrt(7 / 9 * 2 / 9 * 5 / 4 / 5))
    tally = AuditTally()
    tally.observe_pool(torch.tensor([2.0] * 10), torch.tensor([True] * 2 + [False] * 8))
    for _ in range(2):
        tally.add(True, False, 2.0, 0.0)
    for _ in range(3):
        tally.add(False, True, 2.0, 1.0)
    tally.close_step(tally.step_counts())
    assert tally.metrics()["audit/pays_off"] == 0.0 and tally.verdict().startswith("no verdict yet: 3 audited")


def test_risk_controller_online_holds_the_risk_step_by_step():
    # 200 simulated runs of 16 steps, 256 pairs a step, a 10% audit share observed by the controller; P(disagree |
    # ū) = 0.02 + 0.4·ū², so the risk left to the PM below τ is 0.02 + 0.133·τ² (≤ α = 0.1 up to τ = 0.77)
    g = torch.Generator().manual_seed(8)
    held = total = 0
    for _ in range(200):
        ctrl = RiskController(alpha=0.1, delta=0.1)
        for _step in range(16):
            u = torch.rand(256, generator=g)
            if ctrl.tau is None:
                ctrl.calibrate(u, 0.25)
            if len(ctrl.u_cal) >= ctrl.min_calibration:  # τ set by the risk test, not the warm-up budget
                tau = min(max(ctrl.threshold(u), 0.0), 1.0)
                held += 0.02 + 0.4 * tau**2 / 3 <= 0.1
                total += 1
            audit = torch.randperm(256, generator=g)[:26]
            agree = (torch.rand(26, generator=g) >= 0.02 + 0.4 * u[audit] ** 2).double()
            ctrl.observe(u[audit], agree)
            ctrl.update(u, 0.25)
    assert total > 1000 and held / total >= 0.9


def test_risk_controller_from_yaml_runs_rloo_and_checkpoints_its_calibration(tmp_path):
    import yaml

    from lit_route.cli import main

    override = tmp_path / "risk.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"callbacks": [{
        "class_path": "lit_route.callbacks.UncertaintyRouting",
        "init_args": {"judge": {"class_path": "lit_route.judges.HFLocalJudge",
                                "init_args": {"model_path": "builtin:tiny-llama", "mode": "logprob",
                                              "max_prompt_tokens": 512}},
                      "controller": {"class_path": "lit_route.routing.RiskController",
                                     "init_args": {"alpha": 0.2, "delta": 0.1}},
                      "target": {"kind": "fraction", "fraction": 0.25}, "audit_fraction": 0.25}}]}}))
    root = tmp_path / "run"
    main(["rloo", "fit", "--config", "configs/rloo/debug_tiny_budget.yaml", "--config", str(override),
          "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false"])
    (ckpt,) = root.rglob("last.ckpt")
    state = torch.load(ckpt, weights_only=False)
    routing = next(v for k, v in state["callbacks"].items() if "UncertaintyRouting" in k)
    # τ set (from the budget target until enough audited pairs are observed); the audited pairs the judge decided
    # are the calibration, and it is in the checkpoint
    ctrl = routing["controller"]
    assert ctrl["tau"] is not None and 0 < len(ctrl["u_cal"]) == len(ctrl["loss_cal"])
