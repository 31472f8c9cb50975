"""``server``: an external OpenAI-compatible vLLM server that loads every adapter version at runtime.

Start the server with LoRA and runtime adapter loading (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve
<folder> --enable-lora --max-lora-rank R --logprobs-mode processed_logprobs``). After each optimiser step the
adapter is written as a versioned peft folder (which the server must be able to read: a shared filesystem or the
same machine), loaded through ``/v1/load_lora_adapter`` under a versioned name, and the versions before the last
``keep_versions`` are unloaded (``/v1/unload_lora_adapter``) and deleted. Completions come from
``/v1/completions``, one request per sample (each with its own seed), with the prompt's token ids,
``return_token_ids`` and the sampled tokens' log-probs.

Transport failures, timeouts, 429 and 5xx are retried with the judges' policy (exponential backoff with jitter,
``Retry-After`` honoured); every attempt is counted in :attr:`ServerEngine.stats`.
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

from lit_route.judges.limits import CallPolicy, RetryableError, backoff_wait
from lit_route.judges.remote import classify_http_error
from lit_route.policy.engines.base import EngineOutput, SyncMark, pack, prompt_lists, sample_seeds
from lit_route.policy.engines.weights import AdapterVersions, is_peft

# numbers the adapters this process loads: a name is never reused, whichever engine or model loads it
_LOADS = itertools.count(1)


class ServerError(RuntimeError):
    """A request the server refused for good (a bad request, a missing adapter folder)."""


class ServerEngine:
    """Samples from an external ``vllm serve --enable-lora`` through its HTTP API.

    Args:
        options: :class:`~lit_route.policy.sampling.EngineOptions` (``base_url``, ``served_model``,
            ``adapter_dir``, ``keep_versions``, ``timeout_s``, ``max_attempts``).
    """

    name = "server"

    def __init__(self, options):
        if not options.base_url:
            raise ValueError("generation.engine_options.base_url: the server engine needs the server's URL, "
                             "e.g. http://localhost:8000/v1")
        self.options = options
        self.base_url = options.base_url.rstrip("/")
        key = os.environ.get(options.api_key_env) if options.api_key_env else None
        self._headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self._policy = CallPolicy(max_attempts=options.max_attempts, timeout_s=options.timeout_s,
                                  deadline_s=max(options.timeout_s * options.max_attempts, 600.0))
        self._versions = AdapterVersions(options.adapter_dir, options.keep_versions)
        self._names: dict[int, str] = {}
        self._current: str | None = None
        self._synced = SyncMark()
        self.stats = {"requests": 0, "retries": 0}
        self.base_model = options.served_model or self._first_model()

    def _once(self, path: str, body: dict | None) -> bytes:
        """One request (POST with a JSON body, GET without); failures worth retrying raise
        :class:`RetryableError`, a refusal :class:`ServerError`."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base_url}{path}", data=data, headers=self._headers,
                                         method="GET" if body is None else "POST")
        try:
            with urllib.request.urlopen(request, timeout=self.options.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")[:300]
            classified = classify_http_error(err.code, err.headers, text)
            if isinstance(classified, RetryableError):
                raise classified from err
            raise ServerError(f"{self.base_url}{path}: HTTP {err.code}: {text}") from err
        except TimeoutError as err:
            raise RetryableError("timeout", None, str(err)) from err
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as err:
            raise RetryableError("connection", None, str(err)) from err

    def _request(self, path: str, body: dict | None = None) -> bytes:
        """:meth:`_once` under the retry policy; every attempt is counted."""
        try:
            for attempt in Retrying(stop=stop_after_attempt(self._policy.max_attempts),
                                    wait=backoff_wait(self._policy), retry=retry_if_exception_type(RetryableError),
                                    reraise=True):
                with attempt:
                    self.stats["requests"] += 1
                    if attempt.retry_state.attempt_number > 1:
                        self.stats["retries"] += 1
                    return self._once(path, body)
        except RetryableError as err:
            if err.reason != "connection":
                raise
            # a server not started (or gone): say which URL and what to start, not urllib's `Connection refused`
            cause = getattr(err.__cause__, "reason", err.__cause__) or err
            tries = self._policy.max_attempts
            raise ServerError(
                f"generation.engine_options.base_url: nothing answers at {self.base_url} ({cause}; "
                f"{tries} attempt{'s' if tries != 1 else ''}): start the vLLM server there (`vllm serve <model> "
                "--enable-lora ...`, docs/engines.md) or correct the URL") from err
        raise AssertionError("unreachable")

    def _post(self, path: str, body: dict) -> bytes:
        return self._request(path, body)

    def _first_model(self) -> str:
        return json.loads(self._request("/models"))["data"][0]["id"]

    def sync(self, model, version: int) -> None:
        if self._synced.holds(model, version):
            return
        if not is_peft(model):
            raise ValueError("generation.engine: server syncs LoRA adapters; a policy without LoRA needs the "
                             "vllm engine (weights are pushed in-process) or lora settings")
        path, removed = self._versions.write(model, version)
        name = f"policy-v{version}-{os.getpid()}-{next(_LOADS)}"
        self._post("/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())})
        self._names[version], self._current = name, name
        for old in removed:
            old_name = self._names.pop(old, None)
            if old_name is not None:
                self._post("/unload_lora_adapter", {"lora_name": old_name})
        self._synced.set(model, version)

    def _complete(self, prompt: list[int], config, eos_ids: list[int], seed: int | None) -> dict:
        """One sample of ``prompt`` (``n = 1``: vLLM would seed the samples of an ``n = K`` request ``seed + j``,
        the streams of the next seeds)."""
        body = {
            "model": self._current or self.base_model, "prompt": prompt, "n": 1,
            "max_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p,
            "top_k": config.top_k, "stop_token_ids": list(eos_ids), "logprobs": 0, "return_token_ids": True,
            "skip_special_tokens": False, "seed": seed,
        }
        try:
            choices = json.loads(self._post("/completions", body)).get("choices") or []
        except json.JSONDecodeError as err:
            raise ServerError(f"{self.base_url}/completions: not a JSON answer ({err})") from err
        if len(choices) != 1:
            raise ServerError(f"{self.base_url}/completions: expected 1 choice, got {len(choices)}")
        return choices[0]

    def generate(self, model, prompt_ids, prompt_mask, config, eos_ids, pad_id, seed) -> EngineOutput:
        if self._current is None:
            raise RuntimeError("ServerEngine.generate: sync(model, version) first")
        prompts = prompt_lists(prompt_ids, prompt_mask)
        k = config.num_samples
        jobs = list(zip([p for p in prompts for _ in range(k)], sample_seeds(seed, len(prompts), k), strict=True))
        # one request per sample, each with its own seed (as the colocated engine), sent concurrently: the
        # server batches them as it would the samples of one request
        with ThreadPoolExecutor(max_workers=min(64, len(jobs))) as pool:
            choices = list(pool.map(lambda job: self._complete(job[0], config, eos_ids, job[1]), jobs))
        ids = [list(c["token_ids"]) for c in choices]
        logps = [[float(x) for x in c["logprobs"]["token_logprobs"]] for c in choices]
        return pack(ids, logps, eos_ids, pad_id, prompt_ids.device)

    def close(self) -> None:
        for name in self._names.values():
            with contextlib.suppress(ServerError, RetryableError):  # the server may be gone already
                self._post("/unload_lora_adapter", {"lora_name": name})
        self._versions.close()
