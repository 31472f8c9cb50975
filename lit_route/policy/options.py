"""The RLOO module's options, checked at construction with a one-line message naming the option."""

from __future__ import annotations

from lit_route.checks import check_choice, check_nonnegative, check_optional
from lit_route.policy.engines import check_engine_options


def check_options(generation, beta, kl_estimator, updates_per_batch, clip_eps, lr, max_grad_norm, accumulate_batches,
                   pm_batch_size) -> None:
    if generation.num_samples < 2:
        raise ValueError(f"generation.num_samples: RLOO needs K >= 2; got {generation.num_samples}")
    check_nonnegative("generation.max_new_tokens", generation.max_new_tokens, integer=True, positive=True)
    check_nonnegative("generation.temperature", generation.temperature, positive=True)
    check_nonnegative("generation.top_k", generation.top_k, integer=True)
    check_engine_options(generation)
    if not 0 < generation.top_p <= 1:
        raise ValueError(f"generation.top_p: expected a number in (0, 1]; got {generation.top_p}")
    check_nonnegative("beta", beta)
    check_choice("kl_estimator", kl_estimator, ("k1", "k3"))
    check_nonnegative("updates_per_batch", updates_per_batch, integer=True, positive=True)
    check_nonnegative("clip_eps", clip_eps, positive=True)
    check_nonnegative("lr", lr, positive=True)
    check_optional("max_grad_norm", max_grad_norm, positive=True)
    check_nonnegative("accumulate_batches", accumulate_batches, integer=True, positive=True)
    check_nonnegative("pm_batch_size", pm_batch_size, integer=True, positive=True)
    if updates_per_batch > 1 and accumulate_batches > 1:
        raise ValueError("updates_per_batch: reusing a batch (> 1) steps the optimiser on every reuse, which "
                         "accumulation cannot wait for; set accumulate_batches: 1 or updates_per_batch: 1")
