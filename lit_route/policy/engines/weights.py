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


@torch.no_grad()
def merged_weights(model) -> list[tuple[str, torch.Tensor]]:
    """The weights an engine needs to sample from ``model``, under the base model's parameter names.

    With LoRA: the adapted layers' merged weights ``W + ΔW`` only (the rest of the base never changes). Without
    LoRA: every parameter (a fully trained policy changes all of them).

    Returns:
        ``(name, tensor)`` pairs in the Hugging Face checkpoint's names, on the model's device.
    """
    if not is_peft(model):
        return [(name, p.detach()) for name, p in model.named_parameters()]
    from peft.tuners.lora import LoraLayer

    out = []
    adapter = model.active_adapter
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in getattr(module, "lora_A", {}):
            continue
        base = module.get_base_layer()
        weight = base.weight.detach() + module.get_delta_weight(adapter).to(base.weight.dtype)
        out.append((f"{_hf_name(name)}.weight", weight))
        if getattr(base, "bias", None) is not None:
            out.append((f"{_hf_name(name)}.bias", base.bias.detach()))
    return out
