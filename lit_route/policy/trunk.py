"""Running the frozen bottom of a causal LM once per batch, and only its adapted top layers per pass.

With LoRA on the top layers only, the layers below are frozen and identical in every pass an RLOO step makes
over the same sequences: the reference log-probabilities (adapters off), the old log-probabilities (adapters on)
and the update (adapters on, with gradient). The first pass records the hidden state entering the lowest adapted
layer; the later passes start there (as ``inputs_embeds``) with only the top layers in place. For SmolLM2 with
adapters on 4 of 30 layers, the two later passes cost 4/30 of a forward each.

Only architectures whose forward uses ``inputs_embeds`` as the first layer's input unchanged are split (Llama,
Mistral, Qwen2/3: no embedding scale, no added position embeddings); others run whole.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

SPLITTABLE = ("llama", "mistral", "qwen2", "qwen3")


def _decoder(model: nn.Module):
    """(causal LM without wrappers, its decoder with ``layers``) or ``None``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = getattr(base, "model", None)
    if getattr(getattr(base, "config", None), "model_type", None) not in SPLITTABLE:
        return None
    if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return None
    return base, decoder


class Trunk:
    """Splits ``model`` at its lowest layer with trainable parameters.

    Use :meth:`split_index` to know whether a split exists (``None``: nothing to share, run whole).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        found = _decoder(model)
        self.split: int | None = None
        if found is not None:
            self.base, self.decoder = found
            trainable = [i for i, layer in enumerate(self.decoder.layers) if any(p.requires_grad for p in layer.parameters())]
            frozen_rest = not any(p.requires_grad for n, p in self.base.named_parameters() if ".layers." not in n
                                  and not n.startswith(("lm_head", "model.norm")))
            if trainable and trainable[0] > 0 and frozen_rest:
                self.split = trainable[0]
        self.hidden: torch.Tensor | None = None

    @contextmanager
    def capture(self):
        """Records the hidden state entering the first adapted layer during one whole forward pass."""
        layer = self.decoder.layers[self.split]

        def hook(module, args, kwargs):
            self.hidden = (args[0] if args else kwargs["hidden_states"]).detach()

        handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    @contextmanager
    def _top_only(self):
        layers = self.decoder.layers
        self.decoder.layers = nn.ModuleList(list(layers)[self.split :])
        try:
            yield
        finally:
            self.decoder.layers = layers

    def forward_top(self, attention_mask: torch.Tensor, position_ids: torch.Tensor, **kwargs):
        """The model's output from the recorded hidden state through the top layers only (same masks, positions
        and head as a whole pass)."""
        if self.hidden is None:
            raise RuntimeError("Trunk: no hidden state recorded; run a whole pass under capture() first")
        with self._top_only():
            return self.model(inputs_embeds=self.hidden, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, **kwargs)
