"""Budget controllers keep the judged share on target while ū drifts; targets from rate limits and spend."""

import pytest
import torch

from lit_route.routing.audit import AuditTally
from lit_route.routing.controller import BudgetTarget, PIController, QuantileTracker, target_fraction


def drifting_stream(steps=300, n=64, seed=0):
    """ū rising as the policy leaves the PM's data: mean 1 -> 4, spread growing too."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        yield 1.0 + 0.01 * t + (0.2 + 0.002 * t) * torch.randn(n, generator=g, dtype=torch.float64).abs()


@pytest.mark.parametrize("controller", [QuantileTracker(), PIController()])
def test_controller_tracks_the_target_while_a_fixed_threshold_floods_the_judge(controller):
    target, realised, fixed = 0.2, [], []
    tau_fixed = None
    for u in drifting_stream():
        if controller.tau is None:
            controller.calibrate(u, target)
            tau_fixed = controller.tau
        realised.append(float((u > controller.threshold(u)).double().mean()))
        fixed.append(float((u > tau_fixed).double().mean()))
        controller.update(u, target)
    late = realised[100:]
    assert abs(sum(late) / len(late) - target) < 0.03  # on target on average once settled
    assert max(abs(sum(late[i:i + 20]) / 20 - target) for i in range(0, len(late), 20)) < 0.1  # and throughout
    assert sum(fixed[100:]) / len(fixed[100:]) > 0.95  # the fixed τ of step 0 sends nearly every pair


def ramp_stream(steps=400, n=64, drift=0.01, spread=0.1, seed=0):
    """ū rising steadily (+``drift`` a step) with a constant spread: only the level moves."""
    g = torch.Generator().manual_seed(seed)
    for t in range(steps):
        yield 1.0 + drift * t + spread * torch.randn(n, generator=g, dtype=torch.float64)


def realised_share(controller, stream, target):
    shares = []
    for u in stream:
        if controller.tau is None:
            controller.calibrate(u, target)
        shares.append(float((u > controller.threshold(u)).double().mean()))
        controller.update(u, target)
    late = shares[100:]  # once settled
    return sum(late) / len(late)


@pytest.mark.parametrize("target", [0.1, 0.5])
def test_pi_controller_follows_a_ramp_without_lag(target):
    """A ramp of +0.01 a step at a spread of 0.1: the tracker moves τ by η·s·e a step, so it must keep a
    standing error e = 0.01 / (2 · 0.1) = 0.05 to keep up (0.150 realised at a 10% target); the PI controller's
    drift-rate integrator takes that over and the share settles on the target. Over 300 steps of 64 pairs the mean share's
    sampling error is ~0.003 (step errors of ~0.04 RMS, weakly correlated): 0.01 is a wide margin."""
    pi = realised_share(PIController(), ramp_stream(), target)
    assert abs(pi - target) < 0.01, pi
    tracker = realised_share(QuantileTracker(), ramp_stream(), target)
    assert tracker - target > 0.03, tracker  # the lag the PI controller removes
    flat = realised_share(PIController(), ramp_stream(drift=0.0), target)
    assert abs(flat - target) < 0.01, flat  # and no drift is no error either


def test_controller_state_round_trips():
    a = PIController()
    for u in drifting_stream(steps=30):
        a.update(u, 0.3)
    b = PIController()
    b.load_state_dict(a.state_dict())
    u = next(drifting_stream(steps=1, seed=5))
    a.update(u, 0.3), b.update(u, 0.3)
    assert a.tau == b.tau


def test_rate_target_uses_a_share_of_the_provider_limit():
    # 600 requests/min, 80% of it, 10 s steps -> 80 calls per step; 2 calls per pair; 100 pairs -> 40% of pairs
    t = BudgetTarget(kind="rate", fraction=1.0, requests_per_minute=600, rate_share=0.8)
    assert target_fraction(t, 100, 2, step=5, step_seconds=10.0, spent_usd=0, usd_per_call=0) == pytest.approx(0.4)
    capped = BudgetTarget(kind="rate", fraction=0.25, requests_per_minute=600, rate_share=0.8)
    assert target_fraction(capped, 100, 2, 5, 10.0, 0, 0) == 0.25


def test_spend_target_paces_what_is_left_over_the_steps_left():
    # $10 cap, $4 spent, 30 of 100 steps done -> $6 over 70 steps; $0.01 a call, 1 call a pair, 200 pairs
    t = BudgetTarget(kind="spend", fraction=1.0, max_spend_usd=10.0, total_steps=100)
    expected = 6.0 / 70 / 0.01 / 200
    assert target_fraction(t, 200, 1, step=30, step_seconds=1.0, spent_usd=4.0, usd_per_call=0.01) == pytest.approx(expected)
    assert target_fraction(t, 200, 1, step=30, step_seconds=1.0, spent_usd=12.0, usd_per_call=0.01) == 0.0


def test_targets_check_their_options():
    with pytest.raises(ValueError, match=r"^target\.requests_per_minute"):
        BudgetTarget(kind="rate")
    with pytest.raises(ValueError, match=r"^target\.kind"):
        BudgetTarget(kind="tokens")


def test_audit_tally_estimates_agreement_and_routing_gain():
    tally = AuditTally()
    # routed: the judge overturns 3 of 4; audited (random): 1 of 4
    for pm, judge in [(0.5, 0.0), (0.3, 0.0), (-0.2, 1.0), (0.4, 1.0)]:
        tally.add(True, False, pm, judge)
    for pm, judge in [(0.5, 1.0), (-0.3, 0.0), (0.2, 0.0), (0.4, 1.0)]:
        tally.add(False, True, pm, judge)
    tally.close_step(tally.step_counts())
    m = tally.metrics()
    assert m["audit/agreement"] == 0.75 and m["audit/routing_gain"] == pytest.approx(0.75 - 0.25)
