"""The shapes the GPU check runs at, and a random model folder of that shape with a tokenizer of its vocabulary.

Llama-3-8B: hidden 4096, 32 layers, 32 query and 8 key-value heads, MLP 14336, vocabulary 128,256, RoPE θ
500,000, untied output layer. The dry run uses the same architecture at toy width. Weights are random: the shapes
set the speed and the memory, not the values.

The tokenizer is byte-level BPE with exactly the model's vocabulary: 256 byte tokens, merges of printable ASCII
characters into two- and three-character tokens up to the size, the chat specials last. A sampled id decodes to a
few characters that re-encode to about one token, so the PM reads completions about as long as a real tokenizer
would make them (a byte tokenizer would leave all but 261 of 128,256 sampled ids without text).
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
from pathlib import Path

import torch

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256}
DRY_RUN = {"hidden_size": 64, "intermediate_size": 224, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 1024}
SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def model_shape(dry_run: bool) -> dict:
    return dict(DRY_RUN if dry_run else LLAMA3_8B)


def llama_config(shape: dict, tokenizer=None):
    """A ``LlamaConfig`` of ``shape`` (its special ids from ``tokenizer`` when given)."""
    from transformers import LlamaConfig

    ids = {}
    if tokenizer is not None:
        ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    return LlamaConfig(**shape, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                       rms_norm_eps=1e-5, **ids)


def build_tokenizer(vocab_size: int):
    """Byte-level BPE with ``vocab_size`` tokens and a ChatML template (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lit_route.models.tiny import CHATML

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    n_merged = vocab_size - len(vocab) - len(SPECIALS)
    if n_merged < 0:
        raise ValueError(f"vocab_size: at least {len(vocab) + len(SPECIALS)}; got {vocab_size}")
    chars = ["\u0120" if b == 32 else chr(b) for b in range(32, 127)]  # printable ASCII, byte-level spelling
    # every three-character token's left part is a two-character token: all 95² of those come first
    combos = itertools.chain.from_iterable(itertools.product(chars, repeat=n) for n in (2, 3, 4))
    merges = []
    for combo in itertools.islice(combos, n_merged):
        vocab["".join(combo)] = len(vocab)
        merges.append(("".join(combo[:-1]), combo[-1]))
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>",
                                  unk_token=None)
    tok.chat_template = CHATML
    return tok


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Modules built inside are created in ``dtype`` (no float32 copy first: 8B parameters are 32 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def random_model(shape: dict, dev: torch.device, dtype: torch.dtype, causal_lm: bool = False, seed: int = 0,
                 tokenizer=None):
    """A randomly initialised Llama of ``shape``, built directly on ``dev`` in ``dtype``."""
    from transformers import LlamaForCausalLM, LlamaModel

    torch.manual_seed(seed)
    with default_dtype(dtype), dev:
        model = (LlamaForCausalLM if causal_lm else LlamaModel)(llama_config(shape, tokenizer))
    return model


def scratch_dir(work: str | None, need_bytes: int) -> Path:
    """A fresh folder for a model folder of ``need_bytes``: under ``work`` when given, else in ``/dev/shm`` when
    it has room (written and read at memory speed), else in the system's temporary folder."""
    if work is not None:
        Path(work).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="gpu_check_", dir=work))
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.5 * need_bytes:
        return Path(tempfile.mkdtemp(prefix="gpu_check_", dir=shm))
    return Path(tempfile.mkdtemp(prefix="gpu_check_"))


def write_random_model(directory: Path, shape: dict, dev: torch.device, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Writes a random ``LlamaForCausalLM`` of ``shape`` and its tokenizer as a Hugging Face folder (initialised
    on ``dev``, where random draws of 8B parameters take seconds)."""
    tok = build_tokenizer(shape["vocab_size"])
    model = random_model(shape, dev, dtype, causal_lm=True, tokenizer=tok)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return directory


def parameter_bytes(shape: dict, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of a causal LM of ``shape`` in ``dtype`` (embedding and output layer included)."""
    h, m, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kv = h * shape["num_key_value_heads"] // shape["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * m + 2 * h
    return (n * per_layer + 2 * v * h + h) * torch.finfo(dtype).bits // 8
