import torch

from lit_route.uncertainty.spectral import SpectralNormLinear


def test_spectral_norm_stays_bounded_during_training():
    torch.manual_seed(0)
    layer = SpectralNormLinear(16, 16, bound=0.9)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    x = torch.randn(64, 16)
    target = 5.0 * x @ torch.randn(16, 16)  # wants a large spectral norm
    for _ in range(50):
        opt.zero_grad()
        loss = (layer(x) - target).pow(2).mean()
        loss.backward()
        opt.step()
    layer.eval()
    sigma = torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2)
    assert sigma <= 0.9 * 1.01
    # the raw weight did grow: the bound is what holds it
    assert torch.linalg.matrix_norm(layer.weight.detach(), ord=2) > 0.9 * 1.5


def test_projection_is_in_the_forward_path():
    layer = SpectralNormLinear(4, 4, bound=0.5)
    x = torch.randn(3, 4)
    expected = x @ layer.effective_weight().t() + layer.bias
    assert torch.allclose(layer.eval()(x), expected)
    assert torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2) <= 0.5 * 1.001


def _worst_training_norm(layer, steps=200):
    """Adam at lr 1e-3 moves W far per step; returns the largest ‖W̃‖₂ over the training forwards."""
    torch.manual_seed(1)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    n = layer.weight.shape[1]
    x = torch.randn(128, n)
    target = 5.0 * x @ torch.randn(n, n)
    worst = 0.0
    for _ in range(steps):
        opt.zero_grad()
        out = layer(x)
        worst = max(worst, torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2).item())
        (out - target).pow(2).mean().backward()
        opt.step()
    return worst


def test_bound_holds_in_every_training_forward_and_exactly_at_eval():
    # the defaults (a layer this size takes the exact σ): power iteration alone left ‖W̃‖₂ at 0.9623 here,
    # 1.3% over c, because it approaches σ from below and slowly while the top singular values cluster
    torch.manual_seed(0)
    layer = SpectralNormLinear(64, 64, bound=0.95)
    worst = _worst_training_norm(layer)
    # σ from a float32 eigenvalue problem and the norm from an SVD: rounding only (~1e-6 relative)
    assert worst <= 0.95 * (1 + 1e-5), worst
    layer.eval()
    assert torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2).item() <= 0.95 * (1 + 1e-5)


def test_power_iteration_path_holds_the_documented_tolerance():
    # layers above exact_max_features keep the power-iteration estimate: within 2% of c while training (the
    # docstring's figure; 1.3% measured here), exact at eval
    torch.manual_seed(0)
    layer = SpectralNormLinear(64, 64, bound=0.95, exact_max_features=0)
    assert not layer.exact
    worst = _worst_training_norm(layer)
    assert 0.95 < worst <= 0.95 * 1.02, worst
    layer.eval()
    assert torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2).item() <= 0.95 * (1 + 1e-5)


def test_exact_norm_by_hand():
    from lit_route.uncertainty.spectral import spectral_norm

    w = torch.tensor([[3.0, 0.0, 0.0], [0.0, -4.0, 0.0]])  # singular values 4 and 3
    assert float(spectral_norm(w)) == 4.0 and float(spectral_norm(w.t())) == 4.0
