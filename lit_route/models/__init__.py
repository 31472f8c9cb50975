"""Backbones: loading (local folder, GGUF, packaged model, tiny random), LoRA, pooling."""

from lit_route.models.backbone import BackboneSpec, LoraSpec, load_backbone, load_tokenizer
from lit_route.models.pooling import last_token_index, pool_last_token

__all__ = ["BackboneSpec", "LoraSpec", "last_token_index", "load_backbone", "load_tokenizer", "pool_last_token"]
