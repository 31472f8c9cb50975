"""Running a decoder in two parts: the frozen bottom layers once, the trainable top ones for every pass.

With LoRA on the top ``k`` layers (``lora.top_layers``), everything below layer ``L − k`` is frozen, so the
hidden states entering layer ``L − k`` are a fixed function of the tokens. The preference model caches them on
disk across epochs (:func:`bottom_hidden`, :func:`run_top`); an RLOO step records them in its one whole pass (the
reference log-probabilities, :class:`Trunk`) and runs only the top layers for the old log-probabilities and the
update. The top part is run by the model's own ``forward`` over ``inputs_embeds`` with its layer list cut to the
top layers, so masks, positions and rotary embeddings are exactly those of a whole pass.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from torch import nn

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# decoders whose forward feeds ``inputs_embeds`` to the first layer unchanged (no embedding scale, no added
# position embeddings), so that hidden states can be fed back in through it
SPLITTABLE = ("llama", "mistral", "qwen2", "qwen3")


def decoder(backbone: nn.Module) -> nn.Module:
    """The bare decoder (the module holding ``layers``, ``norm``, ``rotary_emb``) inside a backbone, which may
    be wrapped by peft."""
    for module in backbone.modules():
        # its own submodules, not attributes forwarded by a wrapper (peft forwards attribute access)
        if isinstance(module._modules.get("layers"), nn.ModuleList) and "norm" in module._modules:
            return module
    raise ValueError("backbone has no decoder with `layers` and `norm`")


def trainable_start_layer(backbone: nn.Module) -> int | None:
    """The lowest decoder layer holding a trainable parameter, when every trainable parameter sits in a
    decoder layer (or the final norm) and some layer below it is frozen, for a decoder in ``SPLITTABLE``;
    else ``None`` (nothing to cache)."""
    if getattr(getattr(backbone, "config", None), "model_type", None) not in SPLITTABLE:
        return None
    lowest = None
    for name, param in backbone.named_parameters():
        if not param.requires_grad:
            continue
        match = _LAYER.search(name)
        if match is None:
            if name.endswith("norm.weight") and ".layers." not in name:
                continue  # the final norm runs after the top layers anyway
            return None
        index = int(match.group(1))
        lowest = index if lowest is None else min(lowest, index)
    return lowest if lowest else None  # None: nothing trains, or layer 0 trains (no frozen bottom)


class _Stop(Exception):
    pass


@torch.no_grad()
def bottom_hidden(backbone: nn.Module, start: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, L) tokens -> (N, L, H) hidden states entering decoder layer ``start`` (the rest is not computed)."""
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        raise _Stop

    handle = decoder(backbone).layers[start].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"]


@contextmanager
def _top_only(dec: nn.Module, start: int):
    layers = dec.layers
    dec.layers = nn.ModuleList(list(layers)[start:])
    try:
        yield
    finally:
        dec.layers = layers


def run_top(backbone: nn.Module, start: int, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, L, H) hidden states entering layer ``start`` -> (N, L, H) final hidden states (after the norm)."""
    dec = decoder(backbone)
    with _top_only(dec, start):
        out = dec(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row's real tokens come first (what ``pad_batch`` builds)."""
    lengths = attention_mask.long().sum(1, keepdim=True)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return bool(torch.equal(attention_mask.long(), (positions < lengths).long()))


class Trunk:
    """The frozen bottom of a causal LM, shared by several passes over the same sequences.

    ``start`` is the lowest layer holding trainable parameters (``None``: nothing to share, run whole). Under
    :meth:`capture` a whole pass records the hidden state entering that layer; :meth:`forward_top` runs the model
    from it through the top layers (and the output layer) only.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.start = trainable_start_layer(model)
        self.hidden: torch.Tensor | None = None

    @contextmanager
    def capture(self):
        """Records the hidden state entering layer ``start`` during one whole forward pass."""
        def hook(module, args, kwargs):
            self.hidden = (args[0] if args else kwargs["hidden_states"]).detach()

        handle = decoder(self.model).layers[self.start].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def forward_top(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, **kwargs):
        """The model's output from ``hidden`` (entering layer ``start``) through the top layers only."""
        with _top_only(decoder(self.model), self.start):
            return self.model(inputs_embeds=hidden, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, **kwargs)
