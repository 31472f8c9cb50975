"""A benefit-aware routing score: the probability that the PM is wrong, learned on held-out pairs.

An uncertainty method ranks pairs by ``ū``; what routing needs is the chance that the judge would change the
answer, i.e. that the PM is wrong. :func:`fit_error_model` learns ``P(wrong | |d|, log ū)`` by logistic
regression on pairs the PM was not trained on (a validation split), so it weighs the PM's own margin against
its uncertainty as they actually predicted errors; :func:`error_probability` applies it. Two inputs and a bias:
a few hundred held-out pairs are enough, and nothing about the evaluation set is used.
"""

from __future__ import annotations

import torch


def error_features(d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(N,), (N,) -> (N, 2) inputs of the error model: ``|d|`` and ``log ū``."""
    return torch.stack([d.double().abs(), torch.log(u.double().clamp_min(1e-12))], dim=1)


def fit_error_model(d: torch.Tensor, u: torch.Tensor, wrong: torch.Tensor, l2: float = 1e-2,
                    steps: int = 200) -> torch.Tensor:
    """Logistic regression of ``wrong`` (N,) on standardised ``error_features``; returns its 7 parameters
    (2 means, 2 scales, 2 weights, bias) as one float64 tensor."""
    x = error_features(d, u)
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale
    w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe")
    target = wrong.double()

    def closure():
        opt.zero_grad()
        logits = z @ w[:2] + w[2]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + l2 * w[:2].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return torch.cat([mean, scale, w.detach()])


def error_probability(params: torch.Tensor, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``P(PM wrong)`` (N,) for scores ``d`` and uncertainties ``ū`` under a fitted error model."""
    mean, scale, w = params[:2], params[2:4], params[4:]
    z = (error_features(d, u) - mean) / scale
    return torch.sigmoid(z @ w[:2] + w[2])
