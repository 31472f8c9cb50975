"""Rollout engines: what samples the K completions per prompt (see :mod:`.base` for the protocol).

``lean`` and ``hf`` sample with the training model; ``vllm`` with a vLLM engine in the training process;
``server`` with an external vLLM server. :func:`build_engine` is the only place that chooses.
"""

from __future__ import annotations

from lit_route.checks import check_choice, check_nonnegative
from lit_route.policy.engines.base import EngineOutput, RolloutEngine
from lit_route.policy.engines.correction import logprob_gap, truncated_is_weights

ENGINES = ("lean", "hf", "vllm", "server")
SYNC_MODES = ("auto", "adapter", "merged")

__all__ = ["ENGINES", "EngineOutput", "RolloutEngine", "build_engine", "check_engine_options", "engine_statistics"]


def check_engine_options(config) -> None:
    """One clear line for a bad ``generation.engine`` or ``generation.engine_options`` setting."""
    options = config.engine_options
    check_choice("generation.engine", config.engine, ENGINES)
    check_choice("generation.engine_options.sync", options.sync, SYNC_MODES)
    check_nonnegative("generation.engine_options.keep_versions", options.keep_versions, integer=True, positive=True)
    check_nonnegative("generation.engine_options.max_attempts", options.max_attempts, integer=True, positive=True)
    check_nonnegative("generation.engine_options.timeout_s", options.timeout_s, positive=True)
    if not options.importance_sampling_cap >= 1:
        raise ValueError(f"generation.engine_options.importance_sampling_cap: expected >= 1; got "
                         f"{options.importance_sampling_cap}")
    if config.engine == "server" and not options.base_url:
        raise ValueError("generation.engine_options.base_url: the server engine needs the server's URL, "
                         "e.g. http://localhost:8000/v1")


def build_engine(config, spec, policy) -> RolloutEngine:
    """The engine ``config.engine`` names, for ``policy`` loaded from ``spec``.

    Args:
        config: :class:`~lit_route.policy.sampling.GenerationConfig`.
        spec: The policy's :class:`~lit_route.models.backbone.BackboneSpec` (the engine loads the same base).
        policy: The policy model (with LoRA, its rank sizes the engine's adapter slots).
    """
    if config.engine in ("lean", "hf"):
        from lit_route.policy.engines.local import LocalEngine

        return LocalEngine(config.engine)
    if config.engine == "vllm":
        from lit_route.policy.engines.hf_folder import engine_model_dir
        from lit_route.policy.engines.vllm_engine import VLLMEngine
        from lit_route.policy.engines.weights import lora_rank

        return VLLMEngine(str(engine_model_dir(spec)), spec.dtype, lora_rank(policy), config.engine_options)
    if config.engine == "server":
        from lit_route.policy.engines.server import ServerEngine

        return ServerEngine(config.engine_options)
    raise ValueError(f"generation.engine: expected one of {', '.join(ENGINES)}; got {config.engine!r}")


def engine_statistics(engine, engine_logp, trainer_logp, mask, options, stats: dict):
    """Records the engine–trainer gap (``engine/logprob_gap_mean``, ``engine/logprob_gap_max``) and the last
    sync's seconds in ``stats``; returns the truncated importance-sampling weights when
    ``options.importance_sampling`` is on (``None`` otherwise, and for engines without log-probs).

    Both sides are log-probs of the distribution the engine sampled from (after temperature, top-k and top-p,
    renormalised), so the gap is the engine's error alone and the weights correct that error alone: on an engine
    in step with the trainer the gap is rounding noise and the weights are 1, whatever ``top_p`` is.

    Args:
        engine_logp: (N, T) the engine's log-probs of its samples (``EngineOutput.logprobs``), or ``None``.
        trainer_logp: (N, T) the trainer's log-probs of the same tokens under the same truncated distribution
            (:func:`~lit_route.policy.sampling.nucleus_logprobs`); ``None`` when the engine has no log-probs.
        mask: (N, T) completion mask.
    """
    if engine_logp is None:
        return None
    engine_logp = engine_logp.to(trainer_logp.device)
    stats["engine/logprob_gap_mean"], stats["engine/logprob_gap_max"] = logprob_gap(engine_logp, trainer_logp, mask)
    if hasattr(engine, "last_sync_s"):
        stats["time/engine_sync"] = engine.last_sync_s
    if not options.importance_sampling:
        return None
    weights = truncated_is_weights(trainer_logp, engine_logp, mask, options.importance_sampling_cap)
    stats["engine/is_weight_mean"] = float(weights.sum() / mask.sum().clamp_min(1))
    return weights
