"""A tiny random Llama and a byte-level tokenizer, for tests and the debug configs (no download).

``model_path: builtin:tiny-llama`` in a config builds these in memory; ``save_tiny_llama(dir)`` writes them as a
normal Hugging Face folder so the ordinary loading path can be exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_SPEC = "builtin:tiny-llama"

# A ChatML template, so the chat path of the pair encoder can be exercised with the tiny tokenizer.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_byte_tokenizer(chat_template: bool = True):
    """A byte-level BPE tokenizer with no merges: 256 byte tokens plus specials (ids 256+)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", unk_token=None
    )
    if chat_template:
        tok.chat_template = CHATML
    return tok


def build_tiny_llama(vocab_size: int = 261, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised ``LlamaForCausalLM`` with a few layers (seeded, so it is reproducible)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        pad_token_id=256,
        bos_token_id=257,
        eos_token_id=260,
        tie_word_embeddings=True,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def save_tiny_llama(directory: str | Path, seed: int = 0) -> Path:
    """Writes a tiny random Llama and its tokenizer as a Hugging Face folder."""
    directory = Path(directory)
    tok = build_byte_tokenizer()
    build_tiny_llama(vocab_size=len(tok), seed=seed).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
