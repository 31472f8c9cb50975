"""The rollout-engine protocol: prompts' token ids and sampling options in, completions (and log-probs) out.

An engine samples; the trainer keeps computing old, reference and update log-probabilities itself. After each
optimiser step the module calls :meth:`RolloutEngine.sync` with the policy and its version (the optimiser step
count); an engine that samples from the training model itself (``lean``, ``hf``) has nothing to do there, an
external one (``vllm``, ``server``) pushes the adapter or the weights.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from lit_route.policy.sampling import completion_mask


@dataclass
class EngineOutput:
    """K completions per prompt.

    Attributes:
        completions: (B·K, T) sampled ids; prompt b's samples are rows b·K … b·K+K−1; ``pad_id`` after EOS.
        mask: (B·K, T) float, 1 on completion tokens up to and including the first EOS.
        logprobs: (B·K, T) the engine's log-probabilities of the sampled tokens under the distribution it
            sampled from (0 where ``mask`` is 0), or ``None`` when the engine is the training model itself.
    """

    completions: torch.Tensor
    mask: torch.Tensor
    logprobs: torch.Tensor | None = None


@runtime_checkable
class RolloutEngine(Protocol):
    """What :meth:`~lit_route.policy.module.RLOOPolicyModule.rollout` samples with."""

    name: str

    def generate(self, model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, config, eos_ids: list[int],
                 pad_id: int, seed: int | None) -> EngineOutput:
        """K = ``config.num_samples`` completions for each of the (B, P) left-padded prompts."""
        ...

    def sync(self, model, version: int) -> None:
        """Make the engine sample from ``model`` as it is at optimiser step ``version`` (a no-op when it
        already does)."""
        ...

    def close(self) -> None:
        """Release the engine (processes, folders)."""
        ...


class SyncMark:
    """The model an engine last synced and its version. The model itself is kept (weakly), not its ``id()``: a
    model freed and the next one allocated in its place share an ``id()``, and the next one would look synced."""

    def __init__(self):
        self._model: weakref.ref | None = None
        self.version: int | None = None

    def set(self, model, version: int) -> None:
        self._model, self.version = weakref.ref(model), version

    def holds(self, model, version: int | None = None) -> bool:
        """Whether ``model`` (at ``version``, unless ``None``) is the one last synced."""
        return self._model is not None and self._model() is model and version in (None, self.version)


def prompt_lists(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> list[list[int]]:
    """(B, P) left-padded prompts -> B lists of their real token ids."""
    return [row[m.bool()].tolist() for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]


def sample_seeds(seed: int | None, num_prompts: int, k: int) -> list[int | None]:
    """One seed per sample, prompt-major: sample j of prompt b gets a hash of ``(seed, b, j)``.

    vLLM seeds sample j of an ``n = K`` request with ``seed + j``, so per-prompt seeds ``s + b`` (or any seeds a
    small distance apart) make neighbouring prompts share random streams, shifted by one sample: duplicated
    prompts would then get identical completions. Hashing gives every sample its own stream, and the same ones
    for the same ``seed``, in every process (Python's ``hash`` is salted per process for strings).

    Args:
        seed: The batch's seed (``None``: unseeded, every sample gets ``None``).
        num_prompts: B.
        k: Samples per prompt.

    Returns:
        B·K seeds in ``[0, 2**31 − 1)``, or B·K ``None``.
    """
    if seed is None:
        return [None] * (num_prompts * k)
    out = []
    for b in range(num_prompts):
        for j in range(k):
            digest = hashlib.blake2b(f"{seed}/{b}/{j}".encode(), digest_size=8).digest()
            out.append(int.from_bytes(digest, "little") % (2**31 - 1))
    return out


def pack(token_ids: list[list[int]], logprobs: list[list[float]] | None, eos_ids: list[int], pad_id: int,
         device: torch.device | str = "cpu") -> EngineOutput:
    """Right-pads completions (and their log-probs) into tensors.

    Args:
        token_ids: N lists of sampled ids (an engine's output: the EOS, if any, last).
        logprobs: N lists of the same lengths, or ``None``.

    Returns:
        An :class:`EngineOutput` with T = the longest completion (at least 1).
    """
    t = max(1, *(len(s) for s in token_ids))
    comps = torch.full((len(token_ids), t), pad_id, dtype=torch.long)
    for i, s in enumerate(token_ids):
        comps[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    mask = completion_mask(comps, eos_ids, pad_id)
    lp = None
    if logprobs is not None:
        lp = torch.zeros(len(token_ids), t)
        for i, s in enumerate(logprobs):
            lp[i, : len(s)] = torch.tensor(s, dtype=torch.float32)
        lp = lp * mask
    return EngineOutput(comps.to(device), mask.to(device), None if lp is None else lp.to(device))
