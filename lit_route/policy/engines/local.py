"""``lean`` and ``hf``: sampling with the training model itself (no sync, no engine log-probs)."""

from __future__ import annotations

from lit_route.policy.engines.base import EngineOutput
from lit_route.policy.sampling import sample


class LocalEngine:
    """Samples with the policy in the training process: ``lean`` (:mod:`lit_route.policy.decode`) or ``hf``
    (``model.generate``), chosen by ``config.engine``."""

    def __init__(self, name: str = "lean"):
        self.name = name

    def generate(self, model, prompt_ids, prompt_mask, config, eos_ids, pad_id, seed) -> EngineOutput:
        comps, mask = sample(model, prompt_ids, prompt_mask, config, eos_ids, pad_id, seed)
        return EngineOutput(comps, mask, None)

    def sync(self, model, version: int) -> None:
        """Nothing to do: the engine is the model."""

    def close(self) -> None:
        """Nothing to release."""
