"""Heads that map a pooled feature ``h`` to a preference logit and, for SNGP, an uncertainty.

Heads run in float32 whatever the backbone's dtype (the module is shielded from ``.to(bfloat16)``, and
autocast is off inside), and the SNGP precision state is float64: a bf16 backbone never costs the GP its
precision, and uncertainties stay finite.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from lit_route.uncertainty.gp import (
    covariance_from_cholesky,
    factorize_precision,
    gp_weights,
    mean_field,
    precision_increment,
    predictive_variance,
)
from lit_route.uncertainty.random_features import RandomFourierFeatures
from lit_route.uncertainty.spectral import SpectralNormLinear


@runtime_checkable
class PreferenceHead(Protocol):
    """What the preference model needs from a head."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) pooled features -> (N,) logits ``g``."""

    def predict(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, H) -> ``(p, u)``: calibrated logits and uncertainties (N,)."""

    @property
    def has_uncertainty(self) -> bool: ...


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


class LinearHead(_DtypeShield):
    """The plain preference model: ``g = wᵀh``; no uncertainty (``u = 1``)."""

    has_uncertainty = False

    def __init__(self, in_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            return self.linear(h.float()).squeeze(-1)

    def predict(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.forward(h)
        return g, torch.ones_like(g)


class SNGPHead(_DtypeShield):
    """Spectral-normalised projection → random Fourier features → GP output layer (Liu et al. 2020).

    ``forward`` computes the posterior-mean logit only. The precision is built explicitly: ``reset_precision``,
    ``accumulate`` over the training pairs, ``finalize`` (sums across ranks, factorises once in float64).
    ``predict`` then returns ``p = g/u`` and ``u = sqrt(1 + λσ²)``; before ``finalize`` it raises.

    Args:
        in_features: Pooled hidden size H.
        num_features: Number of random features D.
        proj_dim: Output size of the spectral-normalised projection (default H); 0 disables the projection.
        spectral_bound: Bound c on the projection's spectral norm.
        normalize_input: LayerNorm (no affine) before the projection; LLM hidden states have a few huge
            dimensions that would otherwise dominate every distance.
        length_scale: RBF length-scale ℓ; ``None`` sets it by the median heuristic at the first training step (the median distance between
            the projected features of the first training batch, averaged over ranks), so that the kernel neither
            sees every pair of inputs as identical nor as unrelated.
        ridge: Prior precision ``s`` (the ``s·I`` term).
        weighting: ``gaussian`` (w = 1) or ``logistic`` (w = p(1−p)).
        mean_field_factor: λ in ``u = sqrt(1 + λσ²)``.
        seed: Seed of the random feature draws.
    """

    has_uncertainty = True

    def __init__(
        self,
        in_features: int,
        num_features: int = 1024,
        proj_dim: int | None = None,
        spectral_bound: float = 0.95,
        normalize_input: bool = True,
        length_scale: float | None = None,
        ridge: float = 1.0,
        weighting: str = "gaussian",
        mean_field_factor: float = math.pi / 8,
        seed: int = 0,
    ):
        super().__init__()
        gp_weights(torch.zeros(1), weighting)  # validate early
        proj_dim = in_features if proj_dim is None else proj_dim
        self.normalize_input = normalize_input
        self.projection = SpectralNormLinear(in_features, proj_dim, bound=spectral_bound) if proj_dim else None
        rff_in = proj_dim or in_features
        self.features = RandomFourierFeatures(rff_in, num_features, length_scale or 1.0, seed=seed)
        self.register_buffer("length_scale_set", torch.tensor(length_scale is not None))
        self.beta = nn.Linear(num_features, 1, bias=False)
        nn.init.normal_(self.beta.weight, std=0.01)
        self.ridge = ridge
        self.weighting = weighting
        self.mean_field_factor = mean_field_factor
        d = num_features
        self.register_buffer("precision", torch.zeros(d, d, dtype=torch.float64))
        self.register_buffer("covariance", torch.zeros(d, d, dtype=torch.float64))
        self.register_buffer("n_accumulated", torch.zeros((), dtype=torch.float64))
        self.register_buffer("jitter", torch.zeros((), dtype=torch.float64))
        self.register_buffer("finalized", torch.zeros((), dtype=torch.bool))

    def random_features(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N, D) φ, in float32."""
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            if self.normalize_input:
                h = F.layer_norm(h, h.shape[-1:])
            if self.projection is not None:
                h = self.projection(h)
            if self.training and not bool(self.length_scale_set):
                self._median_heuristic(h)
            return self.features(h)

    @torch.no_grad()
    def _median_heuristic(self, h: torch.Tensor) -> None:
        if h.shape[0] < 2:
            return
        dist = torch.cdist(h.detach().float(), h.detach().float())
        off = dist[~torch.eye(h.shape[0], dtype=torch.bool, device=h.device)]
        scale = off.median().clamp_min(1e-6)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(scale)
            scale /= torch.distributed.get_world_size()
        self.features.length_scale.fill_(float(scale))
        self.length_scale_set.fill_(True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        phi = self.random_features(h)
        with torch.autocast(h.device.type, enabled=False):
            return self.beta(phi).squeeze(-1)

    # --- explicit precision state -------------------------------------------------------------------------
    def reset_precision(self) -> None:
        self.precision.zero_()
        self.covariance.zero_()
        self.n_accumulated.zero_()
        self.jitter.zero_()
        self.finalized.fill_(False)

    @torch.no_grad()
    def accumulate(self, h: torch.Tensor) -> None:
        """Adds ``Σ w φφᵀ`` of a batch of training features (N, H) to this rank's precision sum."""
        phi = self.random_features(h)
        logits = self.beta(phi).squeeze(-1)
        self.precision += precision_increment(phi, gp_weights(logits, self.weighting))
        self.n_accumulated += phi.shape[0]

    @torch.no_grad()
    def finalize(self) -> None:
        """Sums the precision across ranks, adds the ridge, factorises once and caches ``P⁻¹``."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.precision)
            torch.distributed.all_reduce(self.n_accumulated)
        eye = torch.eye(self.precision.shape[0], dtype=torch.float64, device=self.precision.device)
        self.precision += self.ridge * eye
        chol, jitter = factorize_precision(self.precision)
        self.covariance.copy_(covariance_from_cholesky(chol))
        self.jitter.fill_(jitter)
        self.finalized.fill_(True)

    def _require_finalized(self) -> None:
        if not bool(self.finalized):
            raise RuntimeError("SNGP head is not finalised: run the FinalizeCovariance pass before asking for variances")

    def variance(self, h: torch.Tensor) -> torch.Tensor:
        """(N, H) -> (N,) float64 predictive variance; requires :meth:`finalize`."""
        self._require_finalized()
        return predictive_variance(self.random_features(h), self.covariance)

    def predict(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._require_finalized()
        phi = self.random_features(h)
        with torch.autocast(h.device.type, enabled=False):
            g = self.beta(phi).squeeze(-1)
        return mean_field(g, predictive_variance(phi, self.covariance), self.mean_field_factor)


HEADS = {"linear": LinearHead, "sngp": SNGPHead}


def build_head(kind: str, in_features: int, **kwargs) -> nn.Module:
    """Builds a head by name (``linear`` or ``sngp``); ``kwargs`` go to the SNGP head."""
    if kind == "linear":
        return LinearHead(in_features)
    if kind == "sngp":
        return SNGPHead(in_features, **kwargs)
    raise ValueError(f"head: expected one of {sorted(HEADS)}, got {kind!r}")
