"""A Hugging Face folder for inference engines that cannot read what the trainer loads (a GGUF file, a package).

vLLM loads safetensors from a folder. A GGUF checkpoint is converted once, the way the trainer loads it
(dequantised by transformers to the policy's dtype), into a cache folder named after the file's SHA-256, so the
engine starts from exactly the weights the trainer starts from and a changed file gets a new folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

from lit_route.models.backbone import BackboneSpec, load_backbone, load_tokenizer, resolve_model_dir
from lit_route.models.tiny import TINY_SPEC

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$LIT_ROUTE_CACHE`` or ``~/.cache/lit_route``."""
    return Path(os.environ.get("LIT_ROUTE_CACHE", Path.home() / ".cache" / "lit_route"))


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def engine_model_dir(spec: BackboneSpec, cache: Path | None = None) -> Path:
    """A folder with ``config.json``, safetensors weights and the tokenizer of ``spec``'s model.

    A plain Hugging Face folder is returned as it is; a GGUF file (and ``builtin:tiny-llama``) is converted once
    into ``<cache>/hf/<sha256 of the file>-<dtype>``. The conversion writes into a temporary folder that is renamed
    when complete, so an interrupted run never leaves a half-written model behind.

    Raises:
        ValueError: ``spec`` is quantised with bitsandbytes (an engine loads its own quantisation).
    """
    if spec.quantization:
        raise ValueError("generation.engine: a bitsandbytes-quantised policy cannot be handed to an inference "
                         "engine; use quantization: null (the engine may quantise on its own)")
    if spec.model_path == TINY_SPEC:
        import transformers

        key = f"tiny-llama-{transformers.__version__}"  # seeded, but its initialisation is transformers'
    elif spec.gguf_file:
        key = file_sha256(Path(resolve_model_dir(spec.model_path)) / spec.gguf_file)[:32]
    else:
        return Path(resolve_model_dir(spec.model_path))
    target = (cache or cache_root()) / "hf" / f"{key}-{spec.dtype}"
    if (target / "config.json").exists():
        return target
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    log.info("converting %s into a Hugging Face folder for the inference engine: %s", spec.gguf_file or key, target)
    model = load_backbone(spec, causal_lm=True)
    model.save_pretrained(partial, safe_serialization=True)
    load_tokenizer(spec).save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(partial, ignore_errors=True)
    return target
