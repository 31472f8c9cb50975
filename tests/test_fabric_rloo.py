"""RLOO on the Fabric engine: the Trainer's step, the routing callback's logic on 1 and 2 processes, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import yaml

from lit_route.callbacks import UncertaintyRouting
from lit_route.fabric import LoopSettings, MetricsRecorder, fit_rloo
from lit_route.judges import HFLocalJudge
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import GenerationConfig

ROOT = Path(__file__).resolve().parents[1]


def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"Tell me about the number {i}." for i in range(8)))
    return str(path)


def build(tmp_path):
    L.seed_everything(0)
    module = RLOOPolicyModule(policy=BackboneSpec(), lora=LoraSpec(r=4, alpha=8), pm_backbone=BackboneSpec(),
                              generation=GenerationConfig(num_samples=3, max_new_tokens=6), lr=1e-2)
    routing = UncertaintyRouting(HFLocalJudge("builtin:tiny-llama", gguf_file=None, max_prompt_tokens=256),
                                 fraction=0.5, max_calls_total=100)
    return module, PromptDataModule(prompts=prompts_file(tmp_path), batch_size=2), routing


def lora(module):
    return {k: v.detach().clone() for k, v in module.policy.named_parameters() if v.requires_grad}


def fabric_run(tmp_path, max_steps, ckpt_path=None, root="fabric"):
    module, dm, routing = build(tmp_path)
    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[MetricsRecorder()])
    loop = LoopSettings(max_steps=max_steps, default_root_dir=str(tmp_path / root), log_every_n_steps=1)
    summary = fit_rloo(fabric, module, dm, loop, [routing], ckpt_path=ckpt_path)
    return module, routing, summary


def accounts(routing) -> dict:
    """The callback's state but its run id (a fresh one per run: the key of its spend in a verdict cache)."""
    return {k: v for k, v in routing.state_dict().items() if k != "run_id"}


def test_fabric_loop_takes_the_trainers_steps(tmp_path):
    module, dm, routing = build(tmp_path)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[routing],
                        default_root_dir=tmp_path)
    trainer.fit(module, dm)
    fabric_module, fabric_routing, summary = fabric_run(tmp_path, 3)
    assert summary["global_step"] == 3
    assert accounts(fabric_routing) == accounts(routing)  # same pairs routed, same ledger
    a, b = lora(module), lora(fabric_module)
    # the same operations in the same order on one process: equal up to float32 rounding of any kernel choice
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    assert any(v.abs().sum() > 0 for k, v in b.items() if "lora_B" in k)  # the policy moved


def test_resume_continues_weights_and_the_routing_ledger(tmp_path):
    straight, straight_routing, _ = fabric_run(tmp_path, 4, root="straight")
    _, first, summary = fabric_run(tmp_path, 2, root="resumed")
    assert first.ledger.calls == 6
    resumed, resumed_routing, final = fabric_run(tmp_path, 4, ckpt_path=summary["last_ckpt"], root="resumed")
    assert final["global_step"] == 4
    assert accounts(resumed_routing) == accounts(straight_routing)  # the budget continued, not restarted
    a, b = lora(straight), lora(resumed)
    for key in a:  # the same batches, samples and optimiser state as the uninterrupted run
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_two_processes_route_one_global_set_and_keep_one_ledger(tmp_path):
    out = tmp_path / "records"
    out.mkdir()
    # the shipped debug config and 2-process strategy config; the routing callback swapped for one that records
    config = yaml.safe_load((ROOT / "configs" / "rloo" / "debug_tiny.yaml").read_text())
    routing = config["trainer"]["callbacks"][0]
    routing["class_path"] = "routing_recorder.RecordingRouting"
    routing["init_args"].update(out_dir=str(out), max_calls_total=15)
    recording = tmp_path / "recording.yaml"
    recording.write_text(yaml.safe_dump({"trainer": {"callbacks": [routing]}}))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    # Fabric starts the second process itself (trainer.devices: 2), as for a user
    done = subprocess.run([sys.executable, "-m", "lit_route", "fabric", "rloo", "--config", "configs/rloo/debug_tiny.yaml",
                           "--config", "configs/trainer/ddp_cpu_2.yaml", "--config", str(recording),
                           "--data.prompts", prompts_file(tmp_path), "--trainer.default_root_dir", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [[json.loads(line) for line in (out / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert len(rows[0]) == len(rows[1]) == 3
    routed_per_step = []
    for a, b in zip(*rows, strict=True):
        assert a["step"] == b["step"] and a["ledger"] == b["ledger"] and a["seen"] == b["seen"]
        # one decision over the gathered global batch: every routed pair is at least as uncertain as every
        # pair left to the PM, whichever rank holds it
        routed = [u for r in (a, b) for u, m in zip(r["u"], r["routed"], strict=True) if m]
        kept = [u for r in (a, b) for u, m in zip(r["u"], r["routed"], strict=True) if not m]
        assert not routed or not kept or min(routed) >= max(kept)
        routed_per_step.append(len(routed))
    # global batch: 2 ranks x 2 prompts x 3 pairs = 12 pairs; half routed = 6 per step, then the cap of 15
    assert routed_per_step == [6, 6, 3]
    assert rows[0][-1]["ledger"]["calls"] == 15 and rows[0][-1]["seen"] == 36
