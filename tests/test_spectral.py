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
