"""``vllm``: a vLLM engine in the training process, following the policy after every optimiser step.

The engine is created once (the base model from a Hugging Face folder, see :mod:`.hf_folder`) and then synced,
per optimiser step, in one of two ways (``engine_options.sync``):

- ``adapter``: the LoRA adapter alone is written as a versioned peft folder and sampling uses a new
  ``LoRARequest``; the versions before the last ``keep_versions`` are removed from the engine and the disk. The
  base weights never move, which is what scales to an 8B policy.
- ``merged``: the adapted layers' merged weights ``W + ΔW`` (with the unadapted parts of the layers vLLM fuses
  with them; a policy without LoRA: all its weights) are loaded into the engine's model through vLLM's in-place
  weight reload, read back from the engine to check that it holds every one of them (:mod:`.readback`), and the
  prefix cache is reset. Sampling then runs at the base model's speed, which on a CPU more than pays for the
  push.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that weights are handed over without a copy
through a socket. Each sample is a request of its own with its own seed. Its log-probabilities are those of the
distribution it sampled from (``processed_logprobs``: after temperature, top-k and top-p), which the module
compares with the trainer's of the same truncated distribution.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time

import torch

from lit_route.policy.engines.base import EngineOutput, SyncMark, pack, prompt_lists, sample_seeds
from lit_route.policy.engines.readback import engine_readback, expected_readback, readback_mismatches
from lit_route.policy.engines.weights import (
    AdapterVersions,
    changed_weight_names,
    conv1d_names,
    engine_lora_rank,
    is_peft,
    merged_weights,
    sync_shortfall,
)

log = logging.getLogger(__name__)


def cpu_environment(kv_cache_gb: int) -> dict[str, str]:
    """Settings of vLLM's CPU build that it does not choose well by itself: every core this process may use
    (by default it reserves one for itself, half of a 2-core machine) and the KV-cache size."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb)}


def sampling_params(config, eos_ids: list[int], seed: int | None):
    """The project's sampling options as vLLM's ``SamplingParams`` for ONE sample (``n = 1``: each sample is its
    own request with its own seed, see :func:`~lit_route.policy.engines.base.sample_seeds`)."""
    from vllm import SamplingParams

    return SamplingParams(
        n=1, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        max_tokens=config.max_new_tokens, stop_token_ids=list(eos_ids), logprobs=0, detokenize=False, seed=seed,
    )


def engine_layout(model) -> tuple[dict[str, list[str]], set[str]]:
    """(Runs inside vLLM's worker.) The engine model's fused layers (``packed_modules_mapping``) and its
    parameter names, as its weight reload names them (without LoRA's ``.base_layer``)."""
    fused = {k: list(v) for k, v in (getattr(model, "packed_modules_mapping", None) or {}).items()}
    return fused, {name.replace(".base_layer.", ".") for name, _ in model.named_parameters()}


# what vLLM's in-place reload logs, per sync, about the layers and weights a partial push leaves alone
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise", "vllm.model_executor.model_loader.reload.inplace")
_RELOAD_NOTICES = ("%s: Failed to load weights", "Following weights were not loaded from checkpoint: %s")


class _ReloadNotices(logging.Filter):
    """Takes vLLM's notices about the weights a reload did not touch off its log; every other record passes.

    A merged push brings only the adapted layers: every other layer keeps its weights, and vLLM says so, one
    warning per layer and one list of every untouched weight per sync. Those are expected. Whether the engine
    holds every weight the push must change is read back from the engine instead (:mod:`.readback`), so nothing
    depends on these records being emitted or caught.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in _RELOAD_NOTICES


@contextlib.contextmanager
def reload_notices():
    """:class:`_ReloadNotices` on vLLM's reload loggers for the duration of the block."""
    notices = _ReloadNotices()
    loggers = [logging.getLogger(name) for name in _RELOAD_LOGGERS]
    for logger in loggers:
        logger.addFilter(notices)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(notices)


def unpack_outputs(outputs) -> tuple[list[list[int]], list[list[float]]]:
    """vLLM ``RequestOutput`` s -> the sampled ids and their log-probs, prompt-major, samples in index order."""
    ids, logps = [], []
    for out in outputs:
        for c in sorted(out.outputs, key=lambda c: c.index):
            tokens = list(c.token_ids)
            ids.append(tokens)
            logps.append([step[t].logprob for step, t in zip(c.logprobs, tokens, strict=True)])
    return ids, logps


class VLLMEngine:
    """A colocated ``vllm.LLM`` sampling for the policy.

    Args:
        model_dir: Hugging Face folder of the policy's base model.
        dtype: The policy's dtype name (``float32``, ``bfloat16``, ``float16``).
        lora_rank: The policy's LoRA rank (``None``: a policy without LoRA, synced by weights).
        options: :class:`~lit_route.policy.sampling.EngineOptions`.
    """

    name = "vllm"

    def __init__(self, model_dir: str, dtype: str, lora_rank: int | None, options):
        for key, value in ({"VLLM_ENABLE_V1_MULTIPROCESSING": "0"} | self._device_env(options)).items():
            os.environ.setdefault(key, value)
        try:
            from vllm import LLM
        except ImportError as err:
            raise ImportError("generation.engine: vllm is not installed (pip install 'lit-route[vllm]'; "
                              "see docs/engines.md)") from err
        self.options = options
        on_gpu = torch.cuda.is_available()
        mode = options.sync if options.sync != "auto" else ("adapter" if on_gpu else "merged")
        self.mode = mode if lora_rank is not None else "merged"
        kwargs = {}
        if self.mode == "adapter":
            kwargs = {"enable_lora": True, "max_loras": max(2, options.keep_versions),
                      "max_lora_rank": engine_lora_rank(lora_rank), "max_cpu_loras": max(2, options.keep_versions)}
        if on_gpu:
            kwargs["gpu_memory_utilization"] = options.gpu_memory_utilization
        eager = options.enforce_eager if options.enforce_eager is not None else not on_gpu
        started = time.perf_counter()
        self.llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=eager, max_model_len=options.max_model_len,
                       logprobs_mode="processed_logprobs", generation_config="vllm", seed=0, **kwargs)
        self.startup_s = time.perf_counter() - started
        self._versions = AdapterVersions(options.adapter_dir, options.keep_versions) if self.mode == "adapter" else None
        self._lora = None
        self._lora_ids: dict[int, int] = {}
        self._next_id = 0
        self._synced = SyncMark()
        self._layout: tuple[dict[str, list[str]], set[str]] | None = None
        self.last_sync_s = 0.0
        self.syncs = 0

    @staticmethod
    def _device_env(options) -> dict[str, str]:
        return {} if torch.cuda.is_available() else cpu_environment(options.cpu_kv_cache_gb)

    def sync(self, model, version: int) -> None:
        if self._synced.holds(model, version):
            return
        started = time.perf_counter()
        if self.mode == "adapter":
            if not is_peft(model):
                raise ValueError("generation.engine_options.sync: adapter needs a LoRA policy; use merged")
            self._sync_adapter(model, version)
        else:
            self._sync_merged(model)
        self._synced.set(model, version)
        self.last_sync_s = time.perf_counter() - started
        self.syncs += 1

    def _sync_merged(self, model) -> None:
        """Pushes the merged weights through vLLM's in-place reload (checkpoint names and layouts in, its own
        kernel layouts (packed, stacked, LoRA-wrapped) restored around the load; a plain ``load_weights`` fails
        once the CPU backend has repacked the weights), then reads a few columns of every engine parameter it
        filled back from the engine and checks that the engine holds every weight that must change.

        Raises:
            RuntimeError: The engine did not take all of the policy's changed weights.
        """
        if self._layout is None:
            self._layout = self.llm.apply_model(engine_layout)[0]
        fused, engine_params = self._layout
        weights = merged_weights(model, fused)
        with reload_notices():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                              "is_checkpoint_format": True})
        self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        seed = self.syncs  # other columns every sync
        expected = expected_readback(weights, fused, engine_params, conv1d_names(model), seed)
        requests = {name: width for name, (width, _) in expected.items()}
        read = self.llm.apply_model(functools.partial(engine_readback, requests, seed))[0]
        short = sync_shortfall([n for n, _ in weights], changed_weight_names(model), fused, engine_params,
                               readback_mismatches(expected, read))
        if short:
            shown = ", ".join(short[:5]) + (f" and {len(short) - 5} more" if len(short) > 5 else "")
            raise RuntimeError(f"vllm engine: the weight sync left {len(short)} of the policy's weights unloaded "
                               f"({shown}); the engine would sample from another model")

    def _sync_adapter(self, model, version: int) -> None:
        from vllm.lora.request import LoRARequest

        path, removed = self._versions.write(model, version)
        self._next_id += 1
        self._lora = LoRARequest(f"policy-v{version}-{self._next_id}", self._next_id, str(path))
        self._lora_ids[version] = self._next_id
        for old in removed:
            lora_id = self._lora_ids.pop(old, None)
            if lora_id is not None and lora_id in self.llm.llm_engine.list_loras():
                self.llm.llm_engine.remove_lora(lora_id)

    def generate(self, model, prompt_ids, prompt_mask, config, eos_ids, pad_id, seed) -> EngineOutput:
        if not self._synced.holds(model):
            raise RuntimeError("VLLMEngine.generate: sync(model, version) first")
        prompts = prompt_lists(prompt_ids, prompt_mask)
        k = config.num_samples
        # B·K requests of one sample each, prompt-major: what vLLM makes of an `n = K` request itself, but with
        # a seed per sample
        requests = [{"prompt_token_ids": p} for p in prompts for _ in range(k)]
        params = [sampling_params(config, eos_ids, s) for s in sample_seeds(seed, len(prompts), k)]
        outputs = self.llm.generate(requests, params, lora_request=self._lora, use_tqdm=False)
        ids, logps = unpack_outputs(outputs)
        return pack(ids, logps, eos_ids, pad_id, prompt_ids.device)

    def close(self) -> None:
        if self._versions is not None:
            self._versions.close()
        self.llm = None
