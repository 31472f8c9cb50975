"""What an engine receives after an optimiser step: a versioned peft adapter folder, or merged weights."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path

import torch

# vLLM sizes its LoRA slots for one of these ranks (``max_lora_rank``)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lora_rank(model) -> int | None:
    """The largest LoRA rank of ``model``'s active adapter (``rank_pattern`` included); ``None`` without LoRA."""
    if not is_peft(model):
        return None
    config = model.peft_config[model.active_adapter]
    return max([config.r, *(config.rank_pattern or {}).values()])


def engine_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds ``rank``.

    Raises:
        ValueError: ``rank`` is larger than vLLM supports.
    """
    for allowed in VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise ValueError(f"lora.r: vLLM serves LoRA ranks up to {VLLM_LORA_RANKS[-1]}; got {rank}")


class AdapterVersions:
    """Writes the policy's adapter (never the base weights) as ``<root>/v<version>``, a peft folder, and removes
    all but the newest ``keep`` versions.

    Args:
        root: The folder (a temporary one, removed by :meth:`close`, when ``None``).
        keep: Versions kept on disk.
    """

    def __init__(self, root: str | None = None, keep: int = 2):
        self._own = root is None
        self.root = Path(tempfile.mkdtemp(prefix="lit_route_adapters_") if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.keep = max(1, keep)
        self.versions: list[tuple[int, Path]] = []
        if self._own:
            weakref.finalize(self, shutil.rmtree, str(self.root), True)

    def write(self, model, version: int) -> tuple[Path, list[int]]:
        """Saves ``model``'s adapter as version ``version``.

        Returns:
            ``(folder, removed)``: the new folder and the versions just removed.
        """
        path = self.root / f"v{version}"
        shutil.rmtree(path, ignore_errors=True)
        model.save_pretrained(str(path))  # a PeftModel saves its adapter only
        self.versions.append((version, path))
        removed = []
        while len(self.versions) > self.keep:
            old, old_path = self.versions.pop(0)
            shutil.rmtree(old_path, ignore_errors=True)
            removed.append(old)
        return path, removed

    def close(self) -> None:
        if self._own:
            shutil.rmtree(self.root, ignore_errors=True)


def _hf_name(peft_name: str) -> str:
    """``base_model.model.model.layers.3.self_attn.q_proj.base_layer`` -> ``model.layers.3.self_attn.q_proj``."""
    name = peft_name.removeprefix("base_model.model.")
    return name.removesuffix(".base_layer")


def engine_name(name: str, fused: dict[str, list[str]]) -> str:
    """A checkpoint parameter name under an engine that fuses layers: ``...self_attn.k_proj.weight`` ->
    ``...self_attn.qkv_proj.weight`` for ``fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}``."""
    module, _, param = name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    for group, members in fused.items():
        if leaf in members:
            return f"{parent}.{group}.{param}" if parent else f"{group}.{param}"
    return name


def changed_weight_names(model) -> set[str]:
    """The checkpoint names of the weights an engine started from the base model lacks: the adapted layers'
    (weight and bias) with LoRA, every parameter without."""
    if not is_peft(model):
        return {name for name, _ in model.named_parameters()}
    from peft.tuners.lora import LoraLayer

    out = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and model.active_adapter in getattr(module, "lora_A", {}):
            base = module.get_base_layer()
            out |= {f"{_hf_name(name)}.{p}" for p in ("weight", "bias") if getattr(base, p, None) is not None}
    return out


@torch.no_grad()
def merged_weights(model, fused: dict[str, list[str]] | None = None) -> list[tuple[str, torch.Tensor]]:
    """The weights an engine needs to sample from ``model``, under the base model's parameter names.

    With LoRA: the adapted layers' merged weights ``W + ΔW`` (the rest of the base never changes), and with them
    the unchanged weights of the layers an engine fuses with an adapted one (``fused``, vLLM's
    ``packed_modules_mapping``): an engine loads a fused layer as a whole, so a LoRA on ``q_proj`` alone must
    bring ``k_proj`` and ``v_proj`` along, or their part of ``qkv_proj`` is left uninitialised. Without LoRA:
    every parameter (a fully trained policy changes all of them).

    Args:
        model: The policy (a peft model or a plain causal LM).
        fused: Engine layer -> the checkpoint layers it fuses, e.g. ``{"qkv_proj": ["q_proj", "k_proj",
            "v_proj"]}`` (``None``: no fusion).

    Returns:
        ``(name, tensor)`` pairs in the Hugging Face checkpoint's names, on the model's device.
    """
    if not is_peft(model):
        return [(name, p.detach()) for name, p in model.named_parameters()]
    from peft.tuners.lora import LoraLayer

    out, siblings = [], []
    adapter = model.active_adapter
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        base = module.get_base_layer()
        weight = base.weight.detach() + module.get_delta_weight(adapter).to(base.weight.dtype)
        out.append((f"{_hf_name(name)}.weight", weight))
        if getattr(base, "bias", None) is not None:
            out.append((f"{_hf_name(name)}.bias", base.bias.detach()))
        parent, _, leaf = name.rpartition(".")
        for members in (fused or {}).values():
            if leaf in members:
                siblings += [f"{parent}.{m}" for m in members if m != leaf]
    pushed = {n for n, _ in out}
    for sibling in dict.fromkeys(siblings):  # in order, once each
        module = model.get_submodule(sibling)
        if isinstance(module, LoraLayer):
            module = module.get_base_layer()
        for param in ("weight", "bias"):
            tensor = getattr(module, param, None)
            if tensor is not None and f"{_hf_name(sibling)}.{param}" not in pushed:
                out.append((f"{_hf_name(sibling)}.{param}", tensor.detach()))
    return out


def conv1d_names(model) -> set[str]:
    """Checkpoint names of ``model``'s weights stored ``(in, out)``: those of transformers' ``Conv1D`` (GPT-2)."""
    from transformers.pytorch_utils import Conv1D

    return {f"{_hf_name(name)}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)}


def sync_shortfall(pushed: list[str], changed: set[str], fused: dict[str, list[str]], engine_params: set[str],
                   mismatched: set[str]) -> list[str]:
    """What a weight push left the engine without, by our own account and the engine's.

    Args:
        pushed: Checkpoint names of the weights pushed.
        changed: Checkpoint names of the weights the engine must take (:func:`changed_weight_names`).
        fused: The engine's fused layers (see :func:`merged_weights`).
        engine_params: The engine model's parameter names (fused names).
        mismatched: Engine parameters that do not hold what was pushed into them, read back from the engine
            (:func:`~lit_route.policy.engines.readback.readback_mismatches`).

    Returns:
        Sorted engine parameter names that the push should have filled and did not (a changed weight left out of
        it, a pushed one the engine does not hold), then the fused parameters it brought in part
        (``name (part: k_proj, v_proj missing)``); empty for a complete push.
    """
    members = {m: g for g, ms in fused.items() for m in ms}
    got: dict[str, set[str]] = {}
    for name in pushed:
        leaf = name.rpartition(".")[0].rpartition(".")[2]
        if leaf in members:
            got.setdefault(engine_name(name, fused), set()).add(leaf)
    left_out = {engine_name(n, fused) for n in changed - set(pushed)} - got.keys()  # a part: named below
    missing = sorted((left_out | set(mismatched)) & engine_params)
    for target, leaves in sorted(got.items()):
        absent = [m for m in fused[members[next(iter(leaves))]] if m not in leaves]
        if absent:
            missing.append(f"{target} (part: {', '.join(absent)} missing)")
    return missing
