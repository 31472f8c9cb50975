"""Sampling K completions per prompt and computing per-token log-probabilities."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

import torch

from lit_route.policy.decode import lean_generate, warp


@dataclass
class EngineOptions:
    """Options of the ``vllm`` and ``server`` rollout engines (see docs/engines.md).

    Args:
        sync: How the engine follows the policy after each optimiser step: ``adapter`` (write the LoRA adapter
            only, as a new versioned peft folder, and sample with a new ``LoRARequest``), ``merged`` (push the
            merged weights of the adapted layers, or all weights of a policy without LoRA, into the engine) or
            ``auto`` (``merged`` on a CPU, where an unmerged adapter costs more than the engine saves, and
            ``adapter`` on a GPU, where it is what scales). ``server`` always syncs adapters.
        adapter_dir: Where adapter versions are written (a temporary folder when ``None``). The ``server``
            engine's server must be able to read it.
        keep_versions: Adapter versions kept on disk and loaded in the engine (older ones are removed).
        max_model_len: Longest prompt + completion the engine plans for.
        gpu_memory_utilization: Share of the GPU's memory a colocated engine may take (the trainer needs the rest).
        cpu_kv_cache_gb: KV-cache size of vLLM's CPU build, in GiB (``VLLM_CPU_KVCACHE_SPACE`` wins if set).
        enforce_eager: Skip vLLM's graph capture and compilation (``None``: on CPU only, where compiling costs
            more than a short run gains).
        base_url: ``server``: the OpenAI-compatible server, e.g. ``http://gpu-node:8000/v1``.
        served_model: ``server``: the base model's name there (``None``: the first model it lists).
        api_key_env: ``server``: environment variable holding its key (``None``: no key).
        timeout_s: ``server``: timeout of one request.
        max_attempts: ``server``: attempts per request for transport failures, 5xx and 429.
        importance_sampling: Weight each token's loss by ``min(π_old/μ_engine, importance_sampling_cap)``
            (truncated importance sampling, TRL's ``vllm_importance_sampling_correction``).
        importance_sampling_cap: The truncation C.
    """

    sync: str = "auto"
    adapter_dir: str | None = None
    keep_versions: int = 2
    max_model_len: int = 2048
    gpu_memory_utilization: float = 0.3
    cpu_kv_cache_gb: int = 1
    enforce_eager: bool | None = None
    base_url: str | None = None
    served_model: str | None = None
    api_key_env: str | None = None
    timeout_s: float = 600.0
    max_attempts: int = 6
    importance_sampling: bool = False
    importance_sampling_cap: float = 3.0


@dataclass
class GenerationConfig:
    """How completions are sampled.

    Args:
        num_samples: K completions per prompt.
        max_new_tokens: Completion length limit.
        temperature: Sampling temperature.
        top_p: Nucleus sampling threshold.
        top_k: Keep only the k most likely tokens (0: off). Set explicitly because transformers' own default
            (50) would otherwise apply silently.
        engine: ``lean`` (a minimal cached sampling loop, :mod:`lit_route.policy.decode`), ``hf``
            (``model.generate``), ``vllm`` (a vLLM engine in the training process) or ``server`` (an external
            OpenAI-compatible vLLM server with runtime LoRA loading). All sample from the same distribution; see
            :mod:`lit_route.policy.engines`.
        engine_options: Options of the ``vllm`` and ``server`` engines.
    """

    num_samples: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    engine: str = "lean"
    engine_options: EngineOptions = field(default_factory=EngineOptions)

    def __setstate__(self, state: dict) -> None:
        # a checkpoint written before a field existed restores without it: give it the default
        for f in fields(self):
            if f.name not in state:
                state[f.name] = f.default_factory() if f.default is MISSING else f.default
        self.__dict__.update(state)


def completion_mask(completions: torch.Tensor, eos_ids: list[int], pad_id: int) -> torch.Tensor:
    """1 on completion tokens up to and including the first EOS, 0 after it (and on padding).

    Args:
        completions: (N, T) generated token ids.
        eos_ids: Token ids that end a completion.
        pad_id: Padding id (generate pads finished rows with it).

    Returns:
        (N, T) float mask.
    """
    is_eos = torch.zeros_like(completions, dtype=torch.bool)
    for e in eos_ids:
        is_eos |= completions == e
    # tokens strictly after the first EOS are cut: cumulative count of EOS before each position
    after = (is_eos.long().cumsum(-1) - is_eos.long()) > 0
    mask = ~after
    if pad_id not in eos_ids:
        mask &= completions != pad_id
    return mask.float()


@torch.no_grad()
def sample(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config: GenerationConfig, eos_ids: list[int],
           pad_id: int, generator_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K samples per prompt from left-padded prompts.

    Args:
        model: A causal LM.
        prompt_ids: (B, P) left-padded prompt ids.
        prompt_mask: (B, P).

    Returns:
        ``(completions, mask)``: (B·K, T) ids (prompt b's samples are rows b·K … b·K+K−1) and their mask.
    """
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    k = config.num_samples
    ids = prompt_ids.repeat_interleave(k, dim=0)
    mask = prompt_mask.repeat_interleave(k, dim=0)
    if config.engine == "lean":
        completions = lean_generate(model, ids, mask, config.max_new_tokens, config.temperature, config.top_k,
                                    config.top_p, eos_ids, pad_id)
        return completions, completion_mask(completions, eos_ids, pad_id)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=config.temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
    )
    completions = out[:, ids.shape[1] :]
    return completions, completion_mask(completions, eos_ids, pad_id)


def sequence_inputs(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor,
                    comp_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``position_ids`` of prompts (left-padded) followed by completions;
    positions follow the real tokens, so left padding does not shift them."""
    attention = torch.cat([prompt_mask, comp_mask.long()], dim=1)
    return {"input_ids": torch.cat([prompt_ids, completions], dim=1), "attention_mask": attention,
            "position_ids": (attention.cumsum(-1) - 1).clamp_min(0)}


def completion_logprobs(logits: torch.Tensor, completions: torch.Tensor, comp_mask: torch.Tensor,
                        temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities of the completion tokens from the logits of the positions that predict them.

    Args:
        logits: (N, T + 1, V) logits of the last T + 1 positions (the last one predicts nothing and is dropped).
        completions: (N, T).
        comp_mask: (N, T).
        temperature: The sampling temperature.

    Returns:
        (N, T) log-probs (0 where the mask is 0).
    """
    logits = logits[:, :-1].float() / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, completions.unsqueeze(-1)).squeeze(-1)
    return logp * comp_mask


def nucleus_logprobs(logits: torch.Tensor, completions: torch.Tensor, comp_mask: torch.Tensor,
                     config: GenerationConfig, chunk: int = 256) -> torch.Tensor:
    """Log-probabilities of the completion tokens under the distribution they were sampled from: temperature,
    then top-k and top-p, renormalised (what vLLM reports as ``processed_logprobs``).

    This is the trainer's side of an engine comparison: at ``top_p < 1`` the untruncated log-probs of
    :func:`completion_logprobs` sit up to −ln(top_p) below the sampled distribution's in every token, whatever
    the engine's weights. Each token's logit is taken against the mass of the trainer's own nucleus, so a token
    the engine kept at the nucleus' edge and the trainer (by rounding) did not still gets a finite value.

    Args:
        logits: (N, T + 1, V) logits of the last T + 1 positions (the last one predicts nothing and is dropped).
        completions: (N, T).
        comp_mask: (N, T).
        config: The sampling options (``temperature``, ``top_k``, ``top_p``).
        chunk: Positions warped at a time (warping sorts the vocabulary: a few (chunk, V) copies).

    Returns:
        (N, T) log-probs (0 where the mask is 0); :func:`completion_logprobs` when nothing is truncated.
    """
    if config.top_p >= 1.0 and not 0 < config.top_k < logits.shape[-1]:
        return completion_logprobs(logits, completions, comp_mask, config.temperature)
    out = torch.zeros(completions.shape, dtype=torch.float32, device=logits.device)
    rows, cols = comp_mask.bool().nonzero(as_tuple=True)  # only the completion tokens' positions
    for start in range(0, rows.numel(), chunk):
        r, c = rows[start : start + chunk], cols[start : start + chunk]
        position = logits[r, c].float()  # (chunk, V)
        token = position.gather(-1, completions[r, c].unsqueeze(-1)).squeeze(-1) / config.temperature
        if 0 < config.top_k < position.shape[-1]:
            mass = torch.logsumexp(warp(position, config.temperature, config.top_k, config.top_p), dim=-1)
        else:
            mass = nucleus_mass(position / config.temperature, config.top_p)
        out[r, c] = token - mass
    return out


def nucleus_mass(logits: torch.Tensor, top_p: float, first: int = 1024) -> torch.Tensor:
    """(N, V) logits (already divided by the temperature) -> (N,) log of the nucleus' unnormalised mass: the
    logsumexp of the smallest set of largest logits whose probability reaches ``top_p`` (the set :func:`warp`
    keeps).

    The nucleus is looked for among the ``first`` largest logits (a partial selection, not a sort of the
    vocabulary); only rows whose nucleus is larger are sorted whole. The running probability is summed in float64:
    summed in float32 over hundreds of tokens it drifts by ~1e-6, enough to move the nucleus' edge by a token.
    """
    first = min(first, logits.shape[-1])
    top = torch.topk(logits, first, dim=-1).values  # sorted, largest first
    probs = torch.exp((top - torch.logsumexp(logits, dim=-1, keepdim=True)).double())
    before = probs.cumsum(-1) - probs  # the probability of the tokens above each one
    kept = before < top_p  # a token stays while the ones above it have not reached top_p (the first always does)
    mass = torch.logsumexp(top.masked_fill(~kept, -torch.inf), dim=-1)
    larger = kept[:, -1]  # the nucleus may go on past the first tokens: those rows are sorted whole
    if first < logits.shape[-1] and bool(larger.any()):
        mass[larger] = nucleus_mass(logits[larger], top_p, logits.shape[-1])
    return mass


def completion_logits(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor,
                      comp_mask: torch.Tensor) -> torch.Tensor:
    """(N, T + 1, V) logits of the positions that predict the completion tokens (and the one after the last):
    only those go through the output layer."""
    inputs = sequence_inputs(prompt_ids, prompt_mask, completions, comp_mask)
    return model(**inputs, use_cache=False, logits_to_keep=completions.shape[1] + 1).logits


def token_logprobs(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completions: torch.Tensor,
                   comp_mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probability of each completion token under ``model`` at the sampling ``temperature``.

    The logits are divided by the temperature the completions were sampled at, so that ratios and KL are those
    of the distribution that produced the samples (as TRL does); at temperature 1 they would describe a
    distribution nobody sampled from. (Top-p truncation is not applied: it would make most ratios undefined;
    :func:`nucleus_logprobs` applies it, for comparisons with an engine.) Only the completion positions go
    through the output layer and the log-softmax.

    Args:
        prompt_ids: (N, P) left-padded prompts (already repeated K times).
        prompt_mask: (N, P).
        completions: (N, T).
        comp_mask: (N, T).
        temperature: The sampling temperature.

    Returns:
        (N, T) log-probs (0 where the mask is 0).
    """
    logits = completion_logits(model, prompt_ids, prompt_mask, completions, comp_mask)
    return completion_logprobs(logits, completions, comp_mask, temperature)


torch.serialization.add_safe_globals([GenerationConfig, EngineOptions])
