"""``vllm``: a vLLM engine in the training process, following the policy after every optimiser step.

The engine is created once (the base model from a Hugging Face folder, see :mod:`.hf_folder`) and then synced,
per optimiser step, in one of two ways (``engine_options.sync``):

- ``adapter``: the LoRA adapter alone is written as a versioned peft folder and sampling uses a new
  ``LoRARequest``; the versions before the last ``keep_versions`` are removed from the engine and the disk. The
  base weights never move, which is what scales to an 8B policy.
- ``merged``: the adapted layers' merged weights ``W + ΔW`` (a policy without LoRA: all its weights) are loaded
  into the engine's model through vLLM's weight loading (``load_weights``), and the prefix cache is reset.
  Sampling then runs at the base model's speed, which on a CPU more than pays for the push.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so that weights are handed over without a copy
through a socket. Its log-probabilities are those of the distribution it sampled from (``processed_logprobs``:
after temperature, top-k and top-p), which the module compares with the trainer's.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from lit_route.policy.engines.base import EngineOutput, pack, prompt_lists
from lit_route.policy.engines.weights import AdapterVersions, engine_lora_rank, is_peft, merged_weights

log = logging.getLogger(__name__)


def cpu_environment(kv_cache_gb: int) -> dict[str, str]:
    """Settings of vLLM's CPU build that it does not choose well by itself: every core this process may use
    (by default it reserves one for itself, half of a 2-core machine) and the KV-cache size."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    return {"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cpus)), "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gb)}


def sampling_params(config, eos_ids: list[int], seed: int | None, index: int):
    """The project's sampling options as vLLM's ``SamplingParams``, one to one: K samples via ``n``."""
    from vllm import SamplingParams

    return SamplingParams(
        n=config.num_samples, temperature=config.temperature, top_p=config.top_p, top_k=config.top_k,
        max_tokens=config.max_new_tokens, stop_token_ids=list(eos_ids), logprobs=0, detokenize=False,
        # one seed per prompt (a shared one would give every prompt the same random stream)
        seed=None if seed is None else (seed * 1_000_003 + index) % (2**31 - 1),
    )


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
        self._synced: tuple[int, int] | None = None
        self.last_sync_s = 0.0
        self.syncs = 0

    @staticmethod
    def _device_env(options) -> dict[str, str]:
        return {} if torch.cuda.is_available() else cpu_environment(options.cpu_kv_cache_gb)

    def sync(self, model, version: int) -> None:
        if self._synced == (id(model), version):
            return
        started = time.perf_counter()
        if self.mode == "adapter":
            if not is_peft(model):
                raise ValueError("generation.engine_options.sync: adapter needs a LoRA policy; use merged")
            self._sync_adapter(model, version)
        else:
            # vLLM's in-place reload: checkpoint names and layouts in, its own kernel layouts (packed, stacked,
            # LoRA-wrapped) restored around the load; a plain `load_weights` fails once the CPU backend has
            # repacked the weights
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(merged_weights(model)),
                                                              "is_checkpoint_format": True})
            self.llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        self._synced = (id(model), version)
        self.last_sync_s = time.perf_counter() - started
        self.syncs += 1

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
        if self._synced is None or self._synced[0] != id(model):
            raise RuntimeError("VLLMEngine.generate: sync(model, version) first")
        prompts = prompt_lists(prompt_ids, prompt_mask)
        params = [sampling_params(config, eos_ids, seed, i) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=self._lora,
                                    use_tqdm=False)
        ids, logps = unpack_outputs(outputs)
        return pack(ids, logps, eos_ids, pad_id, prompt_ids.device)

    def close(self) -> None:
        if self._versions is not None:
            self._versions.close()
        self.llm = None
