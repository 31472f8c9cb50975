"""Every uncertainty head: shapes, ``u`` at or above its floor, and uncertainty that rises off the training data."""

import math

import pytest
import torch

from lit_route.preference.losses import bradley_terry_loss
from lit_route.uncertainty import HEADS, LaplaceHead, SNGPHead, build_head
from lit_route.uncertainty.laplace import log_evidence
from lit_route.uncertainty.sngp import median_pair_distance

OPTIONS = {
    "sngp": {"num_features": 256, "proj_dim": 0, "normalize_input": False, "length_scale": 1.0},
    "laplace": {"normalize_input": False},
    "mc_dropout": {"hidden": 64, "passes": 32, "normalize_input": False},
    "ensemble": {"members": 5, "hidden": 32, "normalize_input": False},
}


def fit_head(kind: str, x: torch.Tensor, labels: torch.Tensor, steps: int = 300):
    torch.manual_seed(0)
    head = build_head(kind, x.shape[1], **OPTIONS.get(kind, {}))
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    head.train()
    for _ in range(steps):
        opt.zero_grad()
        members = head.member_logits(x)
        boot = head.bootstrap_weights(x.shape[0])
        loss = torch.stack([bradley_terry_loss(members[:, m], labels, None if boot is None else boot[:, m])
                            for m in range(members.shape[1])]).mean()
        loss.backward()
        opt.step()
    head.eval()
    if head.needs_covariance_pass:
        head.reset_precision()
        head.accumulate(x)
        head.finalize()
    return head


@pytest.fixture(scope="module")
def toy():
    gen = torch.Generator().manual_seed(0)
    x = 0.5 * torch.randn(300, 4, generator=gen)  # training features around the origin
    labels = (x[:, 0] + 0.5 * x[:, 1] > 0).float()
    return x, labels


def test_registry_covers_every_method():
    assert set(HEADS) == {"linear", "margin", "sngp", "laplace", "mc_dropout", "ensemble"}
    with pytest.raises(ValueError, match="head: expected one of"):
        build_head("gp", 4)


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_shapes_floor_and_order_symmetry(kind, toy):
    x, labels = toy
    head = fit_head(kind, x, labels, steps=50)
    assert head.ready
    g = head(x[:7])
    members = head.member_logits(x[:7])
    p, u = head.predict(x[:7])
    assert g.shape == (7,) and p.shape == (7,) and u.shape == (7,)
    assert members.shape[0] == 7 and members.dim() == 2
    assert torch.isfinite(p).all() and torch.all(u >= head.uncertainty_floor)
    # the pair-level ū is symmetric in the order and at or above the floor; d is antisymmetric by construction
    d = 0.5 * (p[:3] - p[3:6])
    u_bar = head.pair_uncertainty(d, u[:3], u[3:6])
    assert torch.equal(u_bar, head.pair_uncertainty(-d, u[3:6], u[:3]))
    assert torch.all(u_bar >= head.uncertainty_floor)
    # prediction is deterministic: a pair's score does not depend on a second call or on its batch
    p2, u2 = head.predict(x[:7])
    p3, u3 = head.predict(x[3:4])
    assert torch.equal(p, p2) and torch.equal(u, u2)
    # one row alone vs in a batch of 7: same math, different matmul shapes (float32 rounding only)
    assert torch.allclose(p3, p[3:4], atol=1e-5) and torch.allclose(u3, u[3:4], atol=1e-5)


@pytest.mark.parametrize("kind", ["sngp", "laplace", "mc_dropout", "ensemble"])
def test_uncertainty_rises_off_the_training_data(kind, toy):
    x, labels = toy
    head = fit_head(kind, x, labels)
    gen = torch.Generator().manual_seed(1)
    near = 0.5 * torch.randn(200, 4, generator=gen)
    far = 6.0 * torch.nn.functional.normalize(torch.randn(200, 4, generator=gen), dim=1)
    _, u_near = head.predict(near)
    _, u_far = head.predict(far)
    # every method must rank most far points above the typical training-like point
    assert u_far.median() > u_near.median(), (u_near.median(), u_far.median())
    assert (u_far > u_near.median()).float().mean() > 0.8


def test_margin_uncertainty_falls_with_the_margin():
    head = build_head("margin", 4)
    d = torch.tensor([0.0, 0.5, -2.0, 5.0])
    u = head.pair_uncertainty(d, torch.ones(4), torch.ones(4))
    assert torch.allclose(u, 1 + torch.exp(-d.abs()))
    assert u[0] == 2.0 and torch.all(u[1:] < u[0])


def test_linear_head_has_no_uncertainty():
    head = build_head("linear", 4)
    assert not head.has_uncertainty and not head.needs_covariance_pass


def test_log_evidence_by_hand():
    # one eigenvalue 3, ‖w‖² = 2, δ = 1: -½·1·2 + ½·1·log 1 - ½ log(3 + 1) = -1 - log 2
    value = log_evidence(torch.tensor([3.0]), 2.0, torch.tensor([1.0]))
    assert value.item() == pytest.approx(-1 - math.log(2.0))


def test_laplace_prior_by_evidence_and_by_validation(toy):
    x, labels = toy
    torch.manual_seed(0)
    for mode in ("marglik", "validation", 0.5):
        head = LaplaceHead(4, normalize_input=False, prior_precision=mode)
        head.linear.weight.data = torch.tensor([[2.0, 1.0, 0.0, 0.0]])
        head.accumulate(x)
        if mode == "validation":
            head.select_prior_on(x[:50], labels[:50])
        head.finalize()
        prior = float(head.chosen_prior)
        assert prior > 0 and math.isfinite(prior)
        if mode == 0.5:
            assert prior == 0.5
        # the stored precision is the posterior one: data term + δI
        assert torch.allclose(torch.linalg.inv(head.precision), head.covariance, atol=1e-8)
    with pytest.raises(ValueError, match="prior_precision"):
        LaplaceHead(4, prior_precision="evidence")


def test_ridge_scaled_variance_is_the_reference_convention():
    torch.manual_seed(0)
    kwargs = {"num_features": 32, "proj_dim": 0, "normalize_input": False, "length_scale": 1.0, "ridge": 1e-2}
    plain, scaled = SNGPHead(3, **kwargs), SNGPHead(3, ridge_scaled_variance=True, **kwargs)
    scaled.load_state_dict(plain.state_dict())
    x = torch.randn(20, 3)
    for head in (plain, scaled):
        head.accumulate(x)
        head.finalize()
    # edward2 / the paper's code: σ² = s·φᵀ(sI + Σφφᵀ)⁻¹φ
    assert torch.allclose(scaled.variance(x), 1e-2 * plain.variance(x))


def test_median_pair_distance_leaves_out_twins():
    # rows 0,1 are pair A's two orders, 2,3 pair B's (twin offset 2 for the layout [A_ab, B_ab, A_ba, B_ba])
    h = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.1, 0.0], [10.1, 0.0]])
    # distances between different pairs: |0-10|=10, |0-10.1|=10.1, |0.1-10|=9.9, |0.1-10.1|=10 -> median 10
    assert median_pair_distance(h, twin_offset=2).item() == pytest.approx(10.0)
    # with the twins counted (0.1 twice) the median is pulled down
    assert median_pair_distance(h).item() < 10.0
    assert torch.isnan(median_pair_distance(h[:1]))


def test_error_model_learns_which_pairs_are_wrong():
    from lit_route.uncertainty.delegation import PM_SIGNALS, delegation_signals, fit_delegation

    gen = torch.Generator().manual_seed(0)
    d = torch.randn(400, generator=gen)
    u = 1 + torch.rand(400, generator=gen) * 3
    # errors come with high ū, whatever the margin
    wrong = (torch.rand(400, generator=gen) < (u - 1) / 3).float()
    model = fit_delegation(delegation_signals(d, u), wrong, PM_SIGNALS)
    p = model.predict(delegation_signals(d, u))
    assert p.shape == (400,) and torch.all((p > 0) & (p < 1))
    from lit_route.preference.metrics import auroc

    assert auroc(p, wrong) > 0.7
    # the fitted model puts its weight on log ū, not on |d|
    assert abs(model.weights[1]) > 3 * abs(model.weights[0])
