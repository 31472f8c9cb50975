"""The head protocol, and the heads without a posterior: the plain linear head and the margin baseline.

A head maps a pooled feature ``h`` (N, H) to a preference logit ``g`` and, when it has one, an uncertainty ``u``.
Heads run in float32 whatever the backbone's dtype (the module is shielded from ``.to(bfloat16)``, and
autocast is off inside); precision states are float64. The other heads live one per file: ``sngp.py``,
``laplace.py``, ``mc_dropout.py``, ``ensemble.py``; ``registry.py`` builds any of them by name.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class PreferenceHead(Protocol):
    """What the preference model needs from a head.

    ``forward`` is the posterior-mean logit; ``member_logits`` is what the training loss sees (one column,
    or one per ensemble member); ``predict`` gives the calibrated logit ``p`` and the uncertainty ``u`` of each
    ordered sequence, and ``pair_uncertainty`` turns the two orders of a pair into ``ū``. A head that needs a
    pass over the training data after fitting (SNGP, Laplace) says so with ``needs_covariance_pass`` and is
    ``ready`` only after it.
    """

    has_uncertainty: bool
    needs_covariance_pass: bool
    uncertainty_floor: float

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) pooled features -> (N,) logits ``g``."""

    def member_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, M) logits the training loss is taken on (M = 1 except for ensembles)."""

    def bootstrap_weights(self, n_pairs: int) -> torch.Tensor | None:
        """(n_pairs, M) per-member loss weights of a training batch, or ``None``."""

    def predict(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) -> ``(p, u)``: calibrated logits and uncertainties (N,), ``u ≥ uncertainty_floor``."""

    def pair_uncertainty(self, d: torch.Tensor, u_ab: torch.Tensor, u_ba: torch.Tensor) -> torch.Tensor:
        """``d`` and the two orders' ``u`` (each (B,)) -> ``ū`` (B,), symmetric in the order."""

    @property
    def ready(self) -> bool: ...


class _DtypeShield(nn.Module):
    """Keeps every parameter and buffer in its own dtype under ``.to(dtype)``/``.half()``; devices still move."""

    def _apply(self, fn, recurse=True):
        # probe on the module's own device: a dtype-only conversion must leave the device alone
        current = next((t.device for t in (*self.parameters(), *self.buffers())), torch.device("cpu"))
        device = fn(torch.empty(0, device=current)).device
        for module in self.modules():
            for store in (module._parameters, module._buffers):
                for key, tensor in store.items():
                    if tensor is None:
                        continue
                    if tensor.device == device:
                        continue
                    # a tensor on the meta device has no data to copy (``to_empty``): allocate it uninitialised
                    moved = torch.empty_like(tensor.data, device=device) if tensor.is_meta else tensor.data.to(device)
                    if isinstance(tensor, nn.Parameter):
                        if torch._has_compatible_shallow_copy_type(tensor, moved):
                            tensor.data = moved  # same Parameter object: optimizers keep their reference
                            if tensor.grad is not None:
                                tensor.grad.data = tensor.grad.data.to(device)
                        else:  # to or from the meta device: a new Parameter, as nn.Module._apply does
                            store[key] = nn.Parameter(moved, requires_grad=tensor.requires_grad)
                    else:
                        store[key] = moved
        return self


class HeadBase(_DtypeShield):
    """Defaults of the :class:`PreferenceHead` protocol for single-output heads."""

    has_uncertainty = False
    needs_covariance_pass = False
    uncertainty_floor = 1.0

    def member_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.forward(h).unsqueeze(-1)

    def bootstrap_weights(self, n_pairs: int) -> torch.Tensor | None:
        return None

    def pair_uncertainty(self, d: torch.Tensor, u_ab: torch.Tensor, u_ba: torch.Tensor) -> torch.Tensor:
        return 0.5 * (u_ab + u_ba)

    @property
    def ready(self) -> bool:
        return True


class LinearHead(HeadBase):
    """The plain preference model: ``g = wᵀh + b``; no uncertainty (``u = 1``). Extra cost per pair: none.

    Args:
        in_features: Pooled hidden size H.
    """

    def __init__(self, in_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            return self.linear(h.float()).squeeze(-1)

    def predict(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.forward(h)
        return g, torch.ones_like(g)


class MarginHead(LinearHead):
    """The margin baseline: the linear head, with the pair's uncertainty read off its own margin.

    ``ū = 1 + exp(−|d|)`` (in (1, 2], the floor is 1): the smaller the margin, the less sure the PM, with no
    uncertainty model at all. It is the baseline every uncertainty method has to beat. Extra cost per pair: none.
    """

    has_uncertainty = True

    def pair_uncertainty(self, d: torch.Tensor, u_ab: torch.Tensor, u_ba: torch.Tensor) -> torch.Tensor:
        return 1.0 + torch.exp(-d.abs())


def __getattr__(name: str):
    # the SNGP head and the registry live in their own files; importing them from here keeps working
    # (lazily: both build on this module)
    if name == "SNGPHead":
        from lit_route.uncertainty.sngp import SNGPHead

        return SNGPHead
    if name in ("HEADS", "build_head"):
        from lit_route.uncertainty import registry

        return getattr(registry, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
