import math

import pytest
import torch

from lit_route.uncertainty import SNGPHead
from lit_route.uncertainty.gp import (
    factorize_precision,
    gp_weights,
    mean_field,
    precision_increment,
    predictive_variance,
)


def test_precision_increment_matches_sum_of_outer_products():
    phi = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    w = torch.tensor([1.0, 0.5])
    # by hand: 1*[[1,2],[2,4]] + 0.5*[[9,-3],[-3,1]] = [[5.5, 0.5], [0.5, 4.5]]
    expected = torch.tensor([[5.5, 0.5], [0.5, 4.5]], dtype=torch.float64)
    assert torch.equal(precision_increment(phi, w), expected)


def test_gp_weights():
    logits = torch.tensor([0.0, 2.0])
    assert torch.equal(gp_weights(logits, "gaussian"), torch.ones(2, dtype=torch.float64))
    p = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))
    assert torch.allclose(gp_weights(logits, "logistic"), torch.stack([torch.tensor(0.25, dtype=torch.float64), p * (1 - p)]))
    with pytest.raises(ValueError, match="weighting"):
        gp_weights(logits, "cauchy")


def test_mean_field_by_hand():
    g = torch.tensor([2.0, -1.0])
    var = torch.tensor([0.0, 8.0 / math.pi])
    p, u = mean_field(g, var, factor=math.pi / 8)
    # u = sqrt(1 + π/8 · 8/π) = sqrt(2) for the second example, 1 for the first
    assert torch.allclose(u, torch.tensor([1.0, math.sqrt(2.0)]))
    assert torch.allclose(p, torch.tensor([2.0, -1.0 / math.sqrt(2.0)]))


@pytest.mark.parametrize("weighting", ["gaussian", "logistic"])
def test_head_precision_and_variance_equal_naive_float64(weighting):
    torch.manual_seed(0)
    head = SNGPHead(6, num_features=32, proj_dim=0, normalize_input=False, length_scale=2.0, ridge=0.7,
                    weighting=weighting, mean_field_factor=10.0)
    train = torch.randn(50, 6)
    head.accumulate(train[:20])
    head.accumulate(train[20:])
    head.finalize()
    # naive reference, float64, no shortcuts
    w = head.features.weight.double()
    b = head.features.phase.double()
    phi = math.sqrt(2 / 32) * torch.cos(train.double() @ w.t() + b)
    g = phi @ head.beta.weight.double().t()
    weights = torch.ones(50, dtype=torch.float64) if weighting == "gaussian" else (
        torch.sigmoid(g) * (1 - torch.sigmoid(g))).squeeze(1)
    precision = 0.7 * torch.eye(32, dtype=torch.float64)
    for i in range(50):
        precision += weights[i] * torch.outer(phi[i], phi[i])
    assert torch.allclose(head.precision, precision, atol=1e-5)
    test = torch.randn(7, 6)
    phi_t = math.sqrt(2 / 32) * torch.cos(test.double() @ w.t() + b)
    var_ref = torch.stack([phi_t[i] @ torch.linalg.solve(precision, phi_t[i]) for i in range(7)])
    assert torch.allclose(head.variance(test), var_ref, rtol=1e-4, atol=1e-6)
    p, u = head.predict(test)
    g_t = head(test)
    assert torch.all(u >= 1.0)
    assert torch.allclose(p, g_t / u, atol=1e-6)
    assert torch.allclose(u.double(), torch.sqrt(1 + 10.0 * var_ref), rtol=1e-4)


def test_variance_before_finalize_raises():
    head = SNGPHead(4, num_features=8)
    with pytest.raises(RuntimeError, match="not finalised"):
        head.predict(torch.randn(2, 4))


def test_uncertainty_grows_with_distance_from_training_features():
    torch.manual_seed(0)
    head = SNGPHead(2, num_features=512, proj_dim=0, normalize_input=False, length_scale=1.0, ridge=1.0)
    head.accumulate(0.3 * torch.randn(400, 2))  # training features around the origin
    head.finalize()
    direction = torch.tensor([[1.0, 1.0]]) / math.sqrt(2)
    radii = [0.0, 0.5, 1.0, 2.0, 4.0]
    u = torch.cat([head.predict(r * direction)[1] for r in radii])
    assert torch.all(u[1:] > u[:-1]), u
    assert u[-1] > 1.0 + 0.5 * (u[-1] - 1.0) and u[-1] - u[0] > 0.1


def test_jitter_fallback_is_reported(caplog):
    # a rank-deficient "precision" (no ridge) that rounding makes slightly indefinite
    v = torch.randn(5, 1, dtype=torch.float64)
    precision = v @ v.t() - 1e-12 * torch.eye(5, dtype=torch.float64)
    chol, jitter = factorize_precision(precision)
    assert jitter > 0
    assert torch.isfinite(chol).all()
    assert "jitter" in caplog.text


def test_factorization_failure_raises_instead_of_nan():
    bad = torch.full((3, 3), float("nan"), dtype=torch.float64)
    with pytest.raises(torch.linalg.LinAlgError):
        factorize_precision(bad)


def test_predictive_variance_nonnegative():
    cov = torch.eye(3, dtype=torch.float64)
    phi = torch.randn(4, 3)
    assert torch.allclose(predictive_variance(phi, cov), (phi.double() ** 2).sum(1))


def test_median_heuristic_sets_length_scale_once_in_training():
    torch.manual_seed(0)
    head = SNGPHead(3, num_features=16, proj_dim=0, normalize_input=False)
    x = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    head.eval()(x)
    assert not bool(head.length_scale_set)  # scoring never calibrates
    head.train()(x)
    # pairwise distances 3, 4, 5 (each twice): median 4
    assert float(head.features.length_scale) == pytest.approx(4.0)
    head(10 * x)
    assert float(head.features.length_scale) == pytest.approx(4.0)
    assert torch.allclose(head.features.weight, head.features.unit_weight / 4.0)
