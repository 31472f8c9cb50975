"""Names that changed between the transformers releases the project supports (5.x).

transformers 5.20 renamed the key/value cache of model calls and outputs from ``past_key_values`` to ``cache``
(the old name still works there, with a deprecation warning); vLLM's CPU build pins ``transformers<5.20``, so both
must work.
"""

from __future__ import annotations

from transformers.modeling_outputs import CausalLMOutputWithPast

CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def cache_of(output):
    """The key/value cache a model call returned."""
    return getattr(output, CACHE)


def with_cache(cache) -> dict:
    """The keyword argument that hands ``cache`` to a model call."""
    return {CACHE: cache}
