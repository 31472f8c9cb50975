"""Pipelined rewards: the update trains on batch t − s while batch t's judge calls are in flight, on both engines,
against a keep-alive loopback judge with latency; kill and resume with calls in flight."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from loopback import Loopback, longer_is_better

from lit_route.callbacks import UncertaintyRouting
from lit_route.judges import CallPolicy
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import GenerationConfig

ROOT = Path(__file__).resolve().parents[1]
POLICY = dict(max_attempts=3, timeout_s=20.0, backoff_base_s=0.01, backoff_max_s=0.1, deadline_s=60)
LATENCY = (0.2, 0.5)


def parts(tmp_path, url, stages, monkeypatch, **routing):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    L.seed_everything(0)
    module = RLOOPolicyModule(policy=BackboneSpec(), lora=LoraSpec(r=4, alpha=8), pm_backbone=BackboneSpec(),
                              generation=GenerationConfig(num_samples=3, max_new_tokens=6), lr=1e-2,
                              reward_pipeline=stages)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about the number {i}." for i in range(16)))
    judge = OpenAICompatibleJudge("judge", base_url=f"{url}/v1", policy=CallPolicy(**POLICY))
    cb = UncertaintyRouting(judge, fraction=0.5, **routing)
    return module, PromptDataModule(prompts=str(prompts), batch_size=2), cb


def check_run(module, cb, server, steps, stages=1):
    """Every sampled batch trained once, every routed pair judged, the ledger equal to the server's billing."""
    assert cb.batches == steps and len(module.pipeline) == 0 and not cb._inflight
    # 2 prompts x 3 pairs, half routed (and the audit's draws on top, when on)
    assert cb.pairs_seen == steps * 6 and cb.pairs_routed >= steps * 3
    assert not cb.failures, dict(cb.failures)
    assert cb.ledger.calls == server.completions == cb.pairs_routed
    last = module.last_step
    assert last["pipeline/staleness"] == stages  # the last batch trained s updates after it was sampled
    assert LATENCY[0] <= last["judge/latency_p50"] <= last["judge/latency_max"] <= LATENCY[1] + 1.0
    assert "time/judge_wait" in last and last["judge/routed_pairs"] == 3


@pytest.mark.parametrize("stages", [1, 2])
def test_pipelined_trainer_run_with_a_slow_judge(stages, tmp_path, monkeypatch):
    with Loopback(answer=longer_is_better, latency_s=LATENCY) as server:
        module, dm, cb = parts(tmp_path, server.url, stages, monkeypatch, audit_fraction=0.2)
        trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, callbacks=[cb],
                            default_root_dir=tmp_path)
        trainer.fit(module, dm)
    assert trainer.global_step == 4 and dm.consumed == 8  # the synchronous run's 4 batches, no more
    check_run(module, cb, server, 4, stages)
    assert cb.audit.totals["audit_n"] > 0


def test_pipelined_fabric_run_with_a_slow_judge_and_resume(tmp_path, monkeypatch):
    from lit_route.fabric import LoopSettings, MetricsRecorder, fit_rloo

    with Loopback(answer=longer_is_better, latency_s=LATENCY) as server:
        module, dm, cb = parts(tmp_path, server.url, 1, monkeypatch, cache=str(tmp_path / "cache.sqlite"))
        fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[MetricsRecorder()])
        loop = LoopSettings(max_steps=2, default_root_dir=str(tmp_path / "run"), log_every_n_steps=1)
        summary = fit_rloo(fabric, module, dm, loop, [cb])
        assert summary["global_step"] == 2
        check_run(module, cb, server, 2)
        # resume: the checkpoint of a drained run holds no pending batch; the run continues where it stopped
        module, dm, cb = parts(tmp_path, server.url, 1, monkeypatch, cache=str(tmp_path / "cache.sqlite"))
        loop = LoopSettings(max_steps=4, default_root_dir=str(tmp_path / "run"), log_every_n_steps=1)
        summary = fit_rloo(L.Fabric(accelerator="cpu", devices=1, loggers=[MetricsRecorder()]), module, dm, loop,
                           [cb], ckpt_path=summary["last_ckpt"])
    assert summary["global_step"] == 4
    check_run(module, cb, server, 4)


def test_pipeline_needs_one_batch_per_step():
    with pytest.raises(ValueError, match=r"^reward_pipeline"):
        RLOOPolicyModule(policy=BackboneSpec(), pm_backbone=BackboneSpec(), reward_pipeline=1, accumulate_batches=2)
    with pytest.raises(ValueError, match=r"^reward_pipeline"):
        RLOOPolicyModule(policy=BackboneSpec(), pm_backbone=BackboneSpec(), reward_pipeline=-1)


def step_of(path) -> tuple[int, float]:
    """``epoch=0-step=5.ckpt`` or ``...step=5-v1.ckpt`` (written again by the resumed run) -> (5, mtime)."""
    return int(re.search(r"step=(\d+)", path.name).group(1)), path.stat().st_mtime


def routing_state(path):
    state = torch.load(path, weights_only=False, map_location="cpu")
    return next(v for k, v in state["callbacks"].items() if "UncertaintyRouting" in k), state


# the Fabric engine shares the hook and journal code under test; its run is marked slow to keep the suite short
@pytest.mark.parametrize("engine", ["trainer", pytest.param("fabric", marks=pytest.mark.slow)])
def test_kill_with_calls_in_flight_then_resume_pays_each_call_once(engine, tmp_path):
    """SIGKILL while judge calls are in flight (the server holds their answers: billed, never read), resume from a
    checkpoint with batches pending: every routed pair is judged, and the ledger equals what the server billed over
    both processes (what the killed process was answered after its checkpoint is charged from the journal and
    served by the cache; what it sent and never read is charged from the journal and asked once more)."""
    config = yaml.safe_load((ROOT / "configs/rloo/debug_tiny.yaml").read_text())
    steps = 8
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(tmp_path / "run"), max_steps=steps, logger=False, enable_progress_bar=False)
    # every call in flight reaches the server at once; held answers never time out
    policy = {**POLICY, "max_concurrency": 16, "timeout_s": 600, "deadline_s": 1200}
    trainer["callbacks"][0]["init_args"].update(
        judge={"class_path": "lit_route.judges.OpenAICompatibleJudge",
               "init_args": {"model": "judge", "base_url": "URL", "policy": policy}},
        cache=str(tmp_path / "cache.sqlite"), max_calls_total=None)
    trainer["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(tmp_path / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1}})
    config["model"]["reward_pipeline"] = 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "sk-test"}
    command = ["rloo", "fit"] if engine == "trainer" else ["fabric", "rloo"]

    def write(url):
        text = yaml.safe_dump(config).replace("base_url: URL", f"base_url: {url}/v1")
        (tmp_path / "rloo.yaml").write_text(text)
        return [sys.executable, "-m", "lit_route", *command, "--config", str(tmp_path / "rloo.yaml")]

    with Loopback(answer=longer_is_better, latency_s=(0.3, 0.6)) as first:
        # debug_tiny: 2 prompts x 3 pairs a batch, half routed: batches 0-3 answered. Step t samples batch t and
        # trains batch t - 2, so the run sends batches 4, 5 and 6 and then waits for batch 4 for ever: 9 held
        first.hold(after=12)
        proc = subprocess.Popen(write(first.url), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            assert first.wait_held(9, timeout=300), f"{first.holding} calls held, not 9"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        port, billed_first, held = first.server.server_address[1], first.billed, first.holding
    assert billed_first == 12 + held == 21, "no call was in flight at the kill"
    if engine == "trainer":
        saved = sorted((tmp_path / "ckpt").glob("*.ckpt"), key=step_of, reverse=True)
    else:  # the Fabric engine keeps one checkpoint, rewritten every step
        saved = [tmp_path / "run" / "checkpoints" / "last.ckpt"]
    chosen = None
    for path in saved:  # the newest checkpoint with batches pending and calls paid after it
        routing, _ = routing_state(path)
        if routing["inflight"][0] and (engine == "fabric" or routing["ledger"]["calls"] < billed_first):
            chosen = path
            break
    assert chosen is not None, [p.name for p in saved]
    resumed_from = routing_state(chosen)[1]["global_step"]
    assert resumed_from < steps
    with Loopback(answer=longer_is_better, latency_s=(0.3, 0.6), port=port) as second:
        resume = subprocess.run([*write(second.url), "--ckpt_path", str(chosen)], cwd=ROOT, env=env,
                                capture_output=True, timeout=300)
        assert resume.returncode == 0, resume.stderr.decode()[-3000:]
        billed_second = second.billed
    if engine == "trainer":
        final = max((tmp_path / "ckpt").glob("*.ckpt"), key=step_of)
    else:
        final = tmp_path / "run" / "checkpoints" / "last.ckpt"
    routing, state = routing_state(final)
    assert state["global_step"] == steps
    # debug_tiny: 2 prompts x 3 pairs per batch, half routed, one call per pair
    assert routing["pairs_routed"] == 3 * steps and not routing["failures"]
    assert routing["ledger"]["calls"] == billed_first + billed_second  # before: 9 short, the held calls unseen
    assert billed_first + billed_second == 3 * steps + held  # only the calls whose answers were lost asked twice


def test_two_ranks_share_one_ledger_with_batches_in_flight(tmp_path):
    """DDP (2 gloo processes): the routing is decided on the global batch while earlier batches' calls are in
    flight; those calls are reserved against the run's cap, so the cap holds exactly as in the synchronous run."""
    import json

    from routing_recorder import RecordingRouting

    from lit_route.judges import HFLocalJudge

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Prompt number {i}, please answer." for i in range(16)))
    module = RLOOPolicyModule(policy=BackboneSpec(), lora=LoraSpec(r=2, alpha=4), pm_backbone=BackboneSpec(),
                              generation=GenerationConfig(num_samples=3, max_new_tokens=4), reward_pipeline=1)
    cb = RecordingRouting(str(tmp_path), judge=HFLocalJudge("builtin:tiny-llama", gguf_file=None, max_prompt_tokens=128),
                          fraction=0.5, max_calls_total=15)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[cb], default_root_dir=tmp_path)
    torch.set_num_threads(1)
    trainer.fit(module, PromptDataModule(prompts=str(prompts), batch_size=2))
    rows = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert len(rows[0]) == len(rows[1]) == 3  # three batches sampled, three merged
    for a, b in zip(*rows, strict=True):
        assert a["ledger"] == b["ledger"] and a["routed_total"] == b["routed_total"]
    # 2 ranks x 2 prompts x 3 pairs = 12 pairs per batch, half routed; the third batch gets what the cap leaves
    assert [r["routed_total"] for r in rows[0]] == [6, 12, 15] and rows[0][-1]["ledger"]["calls"] == 15


def test_two_ranks_resume_their_own_pending_batches(tmp_path):
    """DDP: a checkpoint written with batches pending holds every rank's (only rank 0 writes the file); the resumed
    run finishes them on the rank that sampled them, and the global accounting matches an uninterrupted run."""
    import json

    from routing_recorder import RecordingRouting

    from lit_route.judges import HFLocalJudge

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Prompt number {i}, please answer." for i in range(16)))

    def fit(out, max_steps, ckpt_path=None, checkpoints=False):
        out.mkdir(exist_ok=True)
        module = RLOOPolicyModule(policy=BackboneSpec(), lora=LoraSpec(r=2, alpha=4), pm_backbone=BackboneSpec(),
                                  generation=GenerationConfig(num_samples=3, max_new_tokens=4), reward_pipeline=2)
        cb = RecordingRouting(str(out), judge=HFLocalJudge("builtin:tiny-llama", gguf_file=None,
                                                           max_prompt_tokens=128), fraction=0.5)
        callbacks = [cb]
        if checkpoints:
            callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1,
                                                                 save_top_k=-1))
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=max_steps, logger=False,
                            enable_progress_bar=False, enable_checkpointing=checkpoints, enable_model_summary=False,
                            callbacks=callbacks, default_root_dir=tmp_path / "run")
        trainer.fit(module, PromptDataModule(prompts=str(prompts), batch_size=2), ckpt_path=ckpt_path)
        return [[json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]

    torch.set_num_threads(1)
    fit(tmp_path / "first", 4, checkpoints=True)
    ckpt = next((tmp_path / "ckpt").glob("*step=1.ckpt"))
    state = torch.load(ckpt, weights_only=False)
    pending = state["lit_route"]["pending"]
    inflight = next(v for k, v in state["callbacks"].items() if "Routing" in k)["inflight"]
    assert len(pending) == len(inflight) == 2 and all(len(p) == 2 for p in pending)  # 2 ranks x 2 batches
    assert [p[0]["ctx"]["key"] for p in pending] == [1, 1]
    resumed = fit(tmp_path / "resumed", 4, ckpt_path=str(ckpt))
    assert len(resumed[0]) == len(resumed[1]) == 3  # the 2 pending batches and the one sampled after resuming
    assert resumed[0][-1]["ledger"] == resumed[1][-1]["ledger"]
    # 4 batches x 12 pairs, half routed, whether or not the run stopped
    assert resumed[0][-1]["routed_total"] == 24 and resumed[0][-1]["seen"] == 48
