"""Tiny random GPT-2, Qwen2 and Gemma models with the byte tokenizer, saved as Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_route.models.tiny import build_byte_tokenizer

ARCHS = ("gpt2", "qwen2", "gemma")


def tiny_config(arch: str, vocab_size: int):
    from transformers import GemmaConfig, GPT2Config, Qwen2Config

    common = {"vocab_size": vocab_size, "pad_token_id": 256, "bos_token_id": 257, "eos_token_id": 260}
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=1024, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=1024, **common)
    if arch == "gemma":
        return GemmaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=1024, **common)
    raise ValueError(arch)


def save_tiny(directory: Path, arch: str, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    tok = build_byte_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tok)))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
