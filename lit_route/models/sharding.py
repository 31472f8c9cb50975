"""FSDP wrapping of the project's models: one unit per transformer block, the head as its own float32 unit.

The preference head keeps float32 parameters and float64 buffers whatever the backbone's dtype. FSDP flattens
the parameters of a unit into one tensor, which must have one dtype, so a head left in the root unit next to
bf16 embeddings cannot be wrapped ("Must flatten tensors with uniform dtype"). The head is therefore wrapped on
its own, with mixed precision off (its buffers are not cast to the buffer dtype) and unsharded (``NO_SHARD``):
the head's explicit methods (``accumulate``, ``finalize``, ``predict``) run outside FSDP's forward and need its
whole parameters on every rank. It is a few megabytes, replicated like under DDP.

Use with either engine::

    strategy:
      class_path: lightning.pytorch.strategies.FSDPStrategy      # the Fabric engine maps it to lightning.fabric
      init_args:
        auto_wrap_policy: {class_path: lit_route.models.sharding.TransformerBlockPolicy}
        activation_checkpointing_policy:
          {class_path: lit_route.models.sharding.TransformerBlockPolicy, init_args: {head: false}}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from torch.distributed.fsdp import ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from lit_route.uncertainty.heads import PreferenceHead

# prefixes that FSDP and activation checkpointing insert into the names of the parameters they wrap
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

# FSDP arguments of the head's unit (see the module docstring)
HEAD_UNIT = {"mixed_precision": None, "sharding_strategy": ShardingStrategy.NO_SHARD}


def clean_name(name: str) -> str:
    """A parameter name as the unwrapped model spells it (no FSDP or checkpoint-wrapper prefixes)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def block_class_names(model: nn.Module) -> set[str]:
    """Class names of the transformer blocks of every Hugging Face model inside ``model``.

    Read from ``_no_split_modules``, the classes transformers itself never splits across devices (the decoder
    layers of Llama, Qwen2, Gemma, Mistral; GPT-2's ``GPT2Block``), so no architecture needs naming by hand.
    """
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    present = {type(m).__name__ for m in model.modules()}
    return names & present


def is_head(module: nn.Module) -> bool:
    """Whether ``module`` is a preference head (the float32 unit)."""
    return isinstance(module, PreferenceHead)


class TransformerBlockPolicy(ModuleWrapPolicy):
    """FSDP auto-wrap (or activation-checkpointing) policy: one unit per transformer block, the head apart.

    Args:
        blocks: Class names of the blocks; default: found in the model (``_no_split_modules``).
        head: Wrap the preference head as its own float32, unsharded unit. Set ``false`` when the policy selects
            modules for activation checkpointing (only the blocks are recomputed).
    """

    def __init__(self, blocks: list[str] | None = None, head: bool = True):
        super().__init__(())
        self.blocks = set(blocks or ())
        self.head = head

    def resolve(self, root: nn.Module) -> set[str]:
        """The block class names used for ``root``; raises when there are none."""
        blocks = self.blocks or block_class_names(root)
        if not blocks:
            raise ValueError(
                "auto_wrap_policy: no transformer blocks found in the model; name their classes with "
                "init_args: {blocks: [MyDecoderLayer]}"
            )
        return blocks

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[nn.Module, dict[str, Any]]:
        blocks = self.resolve(root_module)
        targets: dict[nn.Module, dict[str, Any]] = {}
        for module in root_module.modules():
            if module in ignored_modules:
                continue
            if self.head and is_head(module):
                targets[module] = {**root_kwargs, **HEAD_UNIT}
            elif type(module).__name__ in blocks:
                targets[module] = dict(root_kwargs)
        return targets


def is_fsdp(module: nn.Module | None) -> bool:
    """Whether ``module`` is an FSDP root (its own parameters are sharded outside its forward)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(module, FullyShardedDataParallel)


def call_through(wrapper: nn.Module, module: nn.Module, method: str) -> Callable[..., Any]:
    """``module.<method>`` called through ``wrapper``'s forward (an FSDP or DDP root around ``module``).

    Methods other than ``forward`` bypass the wrapper: under FSDP the root unit's parameters (embeddings, final
    norm) are then still sharded. This patches ``module.forward`` for the duration of one call so the wrapper
    gathers them, as Fabric's ``mark_forward_method`` does.
    """
    if wrapper is module:
        return getattr(module, method)

    def call(*args: Any, **kwargs: Any) -> Any:
        previous = module.__dict__.get("forward")  # an instance-level forward, if someone set one

        def restore() -> None:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous

        def redirected(*a: Any, **kw: Any) -> Any:
            restore()  # the method itself may call the real forward
            return getattr(module, method)(*a, **kw)

        module.__dict__["forward"] = redirected
        try:
            return wrapper(*args, **kwargs)
        finally:
            restore()

    return call


def trainable_names(module: nn.Module) -> Iterable[str]:
    """Names of the parameters that require gradients, as the unwrapped model spells them."""
    return (clean_name(name) for name, p in module.named_parameters() if p.requires_grad)
