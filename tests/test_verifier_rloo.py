"""RLOO with a program as the judge and held-out evaluation by the same verifier, on tiny random models."""

import json
import math

import lightning as L
import pytest

from lit_route.callbacks import UncertaintyRouting, VerifierEval
from lit_route.data.io import DataFormatError
from lit_route.judges import FunctionJudge
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import GenerationConfig
from lit_route.tasks.verify import passes

VERIFIER = "lit_route.tasks.verify:judge_pair"


def fit(prompts: str, callbacks, root, max_steps=2):
    L.seed_everything(0)
    module = RLOOPolicyModule(
        policy=BackboneSpec(), lora=LoraSpec(r=4, alpha=8), pm_backbone=BackboneSpec(),
        generation=GenerationConfig(num_samples=3, max_new_tokens=6), lr=1e-2,
    )
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=list(callbacks),
                        default_root_dir=str(root))  # the run's folder (its paid-calls journal), not the cwd
    trainer.fit(module, PromptDataModule(prompts=prompts, batch_size=2, limit=8))
    return module


def test_verifier_judges_every_pair_and_the_policy_is_evaluated_on_heldout_prompts(tmp_path):
    judge = FunctionJudge(VERIFIER)
    routing = UncertaintyRouting(judge, fraction=1.0, order="fixed")
    evaluation = VerifierEval("bundled:constraints/prompts-heldout.jsonl", every_n_steps=1, limit=6, batch_size=4)
    module = fit("bundled:constraints/prompts-train.jsonl", [routing, evaluation], tmp_path)
    # 2 steps x 2 prompts x 3 pairs (K = 3), one call per pair in fixed order; every verdict (ties included) counts
    assert routing.pairs_routed == 12 and judge.stats.billed == 12 and not routing.failures
    assert module.last_step["judge/fraction"] == 1.0
    assert all(math.isfinite(v) for v in module.last_step.values())
    assert [h["step"] for h in evaluation.history] == [0, 1, 2]
    last = evaluation.history[-1]
    expected = [passes(r["prompt"], c) for r, c in zip(evaluation.records, evaluation.last_completions, strict=True)]
    assert last["accuracy"] == sum(expected) / 6 and len(evaluation.last_completions) == 6
    assert set(last["by_group"]) == {r["family"] for r in evaluation.records}


def test_prompts_outside_the_task_are_counted_failures_and_leave_pm_scores(tmp_path):
    prompts = tmp_path / "other.txt"
    prompts.write_text("\n".join(f"Tell me about the number {i}." for i in range(8)))
    routing = UncertaintyRouting(FunctionJudge(VERIFIER), fraction=0.5, order="fixed")
    module = fit(str(prompts), [routing], tmp_path, max_steps=1)
    assert routing.failures == {"error:ValueError": 3} and routing.pairs_routed == 3
    assert module.last_step["judge/fraction"] == 0.0  # nothing replaced: the PM's scores stand


def test_evaluation_history_survives_a_checkpoint():
    evaluation = VerifierEval("bundled:constraints/prompts-heldout.jsonl", limit=2)
    evaluation.history = [{"step": 0, "accuracy": 0.5, "by_group": {"add": 0.5}}]
    restored = VerifierEval("bundled:constraints/prompts-heldout.jsonl", limit=2)
    restored.load_state_dict(json.loads(json.dumps(evaluation.state_dict())))
    assert restored.history == evaluation.history


def test_bad_prompt_files_name_the_line(tmp_path):
    bad = tmp_path / "heldout.jsonl"
    bad.write_text(json.dumps({"prompt": "What is 1 + 1?"}) + "\n" + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataFormatError, match=r"heldout.jsonl:2: field 'prompt'"):
        VerifierEval(str(bad))
    with pytest.raises(ValueError, match="every_n_steps"):
        VerifierEval("bundled:constraints/prompts-heldout.jsonl", every_n_steps=0)
    with pytest.raises(ValueError, match="verifier: cannot import"):
        VerifierEval("bundled:constraints/prompts-heldout.jsonl", verifier="nowhere_xyz:f")
