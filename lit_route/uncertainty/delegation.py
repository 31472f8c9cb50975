"""A learned delegation router: the probability that the PM is wrong, fitted on held-out pairs.

An uncertainty method ranks pairs by ``ū``; what routing needs is the chance that the judge would change the
answer, i.e. that the PM is wrong. A logistic regression learns ``P(wrong | signals)`` on pairs the PM was not
trained on (validation prompts), so it weighs the signals as they actually predicted errors there. Signals of a
pair ``(x, a, b)``, all symmetric in ``a`` and ``b`` (a router never knows which response is the chosen one):

- the PM's own (:data:`PM_SIGNALS`): ``abs_d`` = ``|d|``, ``log_u`` = ``log ū``;
- surface ones (:data:`SURFACE_SIGNALS`), from the texts alone: ``log_len_sum`` = ``log(1 + |a| + |b|)`` and
  ``log_len_diff`` = ``log(1 + ||a| − |b||)``, lengths in characters.

A :class:`DelegationModel` is a small JSON file (signal names, standardisation, weights); ``lit-route evaluate
--delegation FILE`` routes by it beside the other routers, and the ``learned`` router of the RLHF loop (PM signals
only: the loop's routing sees ``d`` and ``ū``) ranks each batch by it. Fitting on the validation pairs' ``pm score``
output (the ``correct`` field is the PM against the pairs' labels)::

    python -m lit_route.uncertainty.delegation --scores val_scores.jsonl --data val.jsonl \\
        --signals abs_d log_u --output runs/delegation.json
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PM_SIGNALS = ("abs_d", "log_u")
SURFACE_SIGNALS = ("log_len_sum", "log_len_diff")
SIGNALS = PM_SIGNALS + SURFACE_SIGNALS


def delegation_signals(d: torch.Tensor, u: torch.Tensor, len_a: torch.Tensor | None = None,
                       len_b: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every signal that can be computed from what is given: (N,) float64 each.

    Args:
        d: (N,) PM scores.
        u: (N,) the PM's uncertainties ū (> 0).
        len_a, len_b: (N,) lengths of the two responses (characters); without them, no surface signal.
    """
    out = {"abs_d": d.double().abs(), "log_u": torch.log(u.double().clamp_min(1e-12))}
    if len_a is not None and len_b is not None:
        a, b = len_a.double(), len_b.double()
        out["log_len_sum"] = torch.log1p(a + b)
        out["log_len_diff"] = torch.log1p((a - b).abs())
    return out


@dataclass
class DelegationModel:
    """``P(PM wrong) = σ(w · (x − mean) / scale + bias)`` over the named signals ``x``.

    Attributes:
        signals: Signal names (of :data:`SIGNALS`), in the order of the other fields.
        mean: Per-signal mean on the fitting pairs.
        scale: Per-signal standard deviation on the fitting pairs (≥ 1e-6).
        weights: Logistic-regression weights of the standardised signals.
        bias: Intercept.
        fitted_on: How many pairs it was fitted on and their error rate (documentation only).
    """

    signals: tuple[str, ...]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float
    fitted_on: dict

    def __post_init__(self):
        self.signals = tuple(self.signals)
        unknown = [s for s in self.signals if s not in SIGNALS]
        if unknown:
            raise ValueError(f"delegation: unknown signals {unknown}; expected some of {list(SIGNALS)}")
        if not self.signals or not len(self.mean) == len(self.scale) == len(self.weights) == len(self.signals):
            raise ValueError("delegation: signals, mean, scale and weights must be non-empty and of one length")

    @property
    def needs_texts(self) -> bool:
        """Whether a surface signal (response lengths) is among the inputs."""
        return any(s in SURFACE_SIGNALS for s in self.signals)

    def logits(self, signals: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits (N,) float64 of ``P(wrong)`` from :func:`delegation_signals`' output."""
        missing = [s for s in self.signals if s not in signals]
        if missing:
            raise ValueError(f"delegation: the model needs the signals {missing}, which are not available here")
        x = torch.stack([signals[s].double() for s in self.signals], dim=-1)
        z = (x - torch.tensor(self.mean, dtype=torch.float64)) / torch.tensor(self.scale, dtype=torch.float64)
        return z @ torch.tensor(self.weights, dtype=torch.float64) + self.bias

    def predict(self, signals: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``P(PM wrong)`` (N,) float64."""
        return torch.sigmoid(self.logits(signals))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DelegationModel:
        """Reads a model file; a missing, unreadable or malformed file raises one ``ValueError`` naming it."""
        try:
            raw = json.loads(Path(path).read_text())
            model = cls(**{k: raw[k] for k in ("signals", "mean", "scale", "weights", "bias")},
                        fitted_on=raw.get("fitted_on", {}))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"delegation: {path} is not a delegation model file ({err})") from err
        if not all(math.isfinite(v) for v in [*model.mean, *model.scale, *model.weights, model.bias]):
            raise ValueError(f"delegation: {path} holds a non-finite number")
        return model


def fit_delegation(signals: Mapping[str, torch.Tensor], wrong: torch.Tensor, names: Sequence[str],
                   l2: float = 1e-2, steps: int = 200) -> DelegationModel:
    """Logistic regression of ``wrong`` (N,) (1 where the PM is wrong) on the standardised ``names`` signals.

    The loss is the mean binary cross-entropy plus ``l2 · |w|²`` (the intercept is not penalised), minimised by
    L-BFGS from zero.
    """
    if not names:
        raise ValueError("delegation: no signals to fit on")
    x = torch.stack([signals[s].double() for s in names], dim=-1)
    mean, scale = x.mean(0), x.std(0).nan_to_num(1.0).clamp_min(1e-6)
    z = (x - mean) / scale
    target = wrong.double()
    w = torch.zeros(len(names) + 1, dtype=torch.float64, requires_grad=True)
    # a handful of parameters in float64: converge tightly, so that the fit is the optimum, not near it
    opt = torch.optim.LBFGS([w], max_iter=steps, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                            tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        logits = z @ w[:-1] + w[-1]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target) + l2 * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = w.detach()
    return DelegationModel(tuple(names), mean.tolist(), scale.tolist(), w[:-1].tolist(), float(w[-1]),
                           {"pairs": int(target.numel()), "error_rate": float(target.mean()), "l2": l2})


def routing_model(router: str, path: str | None) -> DelegationModel | None:
    """The RLHF loop's ``learned`` router model (``None`` for the other routers); refuses a model the loop cannot
    feed: its routing decision sees ``d`` and ``ū`` only."""
    if (router == "learned") != (path is not None):
        raise ValueError("delegation: the learned router needs a delegation model file, and only it takes one")
    if path is None:
        return None
    model = DelegationModel.load(path)
    if model.needs_texts:
        raise ValueError(f"delegation: {path} uses response lengths; the routing decision sees only d and ū "
                         f"(fit it on {' and '.join(PM_SIGNALS)})")
    return model


def main(argv: list[str] | None = None) -> None:
    """Fits a model on a ``pm score`` file of labelled pairs and writes it (see the module docstring)."""
    from lit_route.data.readers import load_pairs
    from lit_route.eval.scores import read_scores

    parser = argparse.ArgumentParser(prog="python -m lit_route.uncertainty.delegation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", required=True, help="`lit-route pm score` output on labelled held-out pairs")
    parser.add_argument("--data", nargs="+", required=True, help="the pairs that were scored")
    parser.add_argument("--signals", nargs="+", default=list(PM_SIGNALS), choices=SIGNALS)
    parser.add_argument("--l2", type=float, default=1e-2)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    try:
        pairs = load_pairs(args.data)
        d, u = read_scores(args.scores, pairs)
        lengths = [torch.tensor([float(len(getattr(p, side))) for p in pairs]) for side in ("chosen", "rejected")]
        model = fit_delegation(delegation_signals(d, u, *lengths), (d <= 0).double(), args.signals, args.l2)
    except (OSError, ValueError) as err:
        parser.exit(1, f"error: {err}\n")
    model.save(args.output)
    print(json.dumps(asdict(model)))


if __name__ == "__main__":
    main()
