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


def test_bound_holds_in_every_training_forward_and_exactly_at_eval():
    # Adam at lr 1e-3 moves W far per step; a single warm-started power iteration let ‖W̃‖₂ reach 1.14·c here
    torch.manual_seed(0)
    layer = SpectralNormLinear(64, 64, bound=0.95)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3)
    x = torch.randn(128, 64)
    target = 5.0 * x @ torch.randn(64, 64)
    worst = 0.0
    for _ in range(200):
        opt.zero_grad()
        out = layer(x)
        worst = max(worst, torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2).item())
        (out - target).pow(2).mean().backward()
        opt.step()
    # power iteration approaches σ from below and converges slowly when the top singular values cluster (an
    # orthogonal init starts with all of them equal): 2% is the tolerance the training forwards are held to
    assert worst <= 0.95 * 1.02, worst
    layer.eval()
    # at eval σ comes from an exact SVD: only float32 rounding of the SVD and the norm remains (~1e-7 relative)
    assert torch.linalg.matrix_norm(layer.effective_weight().detach(), ord=2).item() <= 0.95 * (1 + 1e-5)
