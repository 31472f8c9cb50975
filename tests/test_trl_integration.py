"""lit_route's routed pairwise reward inside TRL's GRPOTrainer: tiny policy, tiny PM, a function judge, CPU."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl", reason="needs trl: pip install 'lit-route[trl]' (`make test` installs it)")

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from lit_route.integrations.routed import RoutedRewards, build_decision
from lit_route.integrations.trl import STATE_FILE, RoutedRewardFunction
from lit_route.judges.function import FunctionJudge
from lit_route.models.backbone import BackboneSpec
from lit_route.policy.context import RewardContext
from lit_route.policy.pm_scoring import load_reward_pm, score_groups
from lit_route.rewards.pairwise import pairwise_rewards

K = 4  # num_generations


def greater_wins(prompt, a, b):
    """A position-independent judge: the response that sorts later wins (the display order cannot matter)."""
    return "A" if a > b else "B" if b > a else "tie"


@pytest.fixture(scope="module")
def tiny_pm():
    torch.manual_seed(0)
    return load_reward_pm(None, BackboneSpec())


class Recorder:
    """Wraps the reward function and keeps what TRL passed and what it got back."""

    __name__ = "lit_route"

    def __init__(self, function):
        self.function, self.calls = function, []

    def __call__(self, prompts, completions, **kwargs):
        out = self.function(prompts, completions, **kwargs)
        self.calls.append((list(prompts), list(completions), out))
        return out


def train(model_dir, out_dir, function, max_steps=3, resume=None, kind="grpo"):
    ds = Dataset.from_dict({"prompt": [f"Tell me about the number {i}." for i in range(16)]})
    config, trainer_class = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config(output_dir=str(out_dir), use_cpu=True, per_device_train_batch_size=2 * K, num_generations=K,
                      max_completion_length=6, max_steps=max_steps, logging_steps=1, report_to=[], save_steps=2,
                      bf16=False, learning_rate=1e-3, seed=0, save_only_model=False)
    inner = function.function if isinstance(function, Recorder) else function
    trainer = trainer_class(model=str(model_dir), reward_funcs=function, args=args, train_dataset=ds,
                          callbacks=[inner.callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def hand_rewards(group, c=2.0):
    """r_i = mean_{j≠i} S_ij with every pair judged: S_ij = +c when completion i sorts later, −c earlier, 0 equal."""
    k = len(group)
    return [sum(c * ((a > b) - (a < b)) for j, b in enumerate(group) if j != i) / (k - 1)
            for i, a in enumerate(group)]


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_every_pair_judged_gives_the_hand_derived_rewards(tmp_path, tiny_model_dir, tiny_pm, kind):
    pm, encoder = tiny_pm
    judge = FunctionJudge(greater_wins)
    rewards = RoutedRewards(pm, encoder, build_decision(judge, fraction=1.0, order="random"))
    recorder = Recorder(RoutedRewardFunction(rewards, num_generations=K))
    trainer = train(tiny_model_dir, tmp_path / "out", recorder, kind=kind)
    assert len(recorder.calls) == 3
    for prompts, completions, out in recorder.calls:
        assert len(out) == len(prompts) == 2 * K and prompts[0] == prompts[K - 1] != prompts[K]  # TRL's grouping
        expected = [r for g in range(2) for r in hand_rewards(completions[g * K : (g + 1) * K])]
        assert out == pytest.approx(expected, abs=1e-6)  # ±2/3 sums of exact values: float rounding only
    # TRL trained on what we returned (its own log of the reward column), and logged our numbers
    logged = list(trainer._logs["rewards"]["lit_route"])[-2 * K :]
    assert logged == pytest.approx(recorder.calls[-1][2], abs=1e-6)  # stored as float32 by TRL
    history = [h for h in trainer.state.log_history if "lit_route/judge/routed_pairs" in h]
    assert len(history) == 3 and all(h["lit_route/judge/routed_pairs"] == 2 * K * (K - 1) / 2 for h in history)
    assert all(h["lit_route/judge/fraction"] == 1.0 for h in history)
    assert judge.stats.billed == 3 * 2 * K * (K - 1) // 2 == rewards.decision.ledger.calls


def test_grpo_partial_routing_matches_the_lightning_callbacks_rewards(tmp_path, tiny_model_dir, tiny_pm):
    """Half the pairs routed by ū: the TRL rewards equal those of the routing callback of `lit-route rloo` on the
    same groups (the same PM, the same decision object, driven through the callback's own hooks)."""
    from lit_route.callbacks.routing import UncertaintyRouting

    pm, encoder = tiny_pm
    judge = FunctionJudge(greater_wins)
    rewards = RoutedRewards(pm, encoder, build_decision(judge, fraction=0.5, max_calls_total=40))
    recorder = Recorder(RoutedRewardFunction(rewards, num_generations=K))
    train(tiny_model_dir, tmp_path / "out", recorder)
    callback = UncertaintyRouting(FunctionJudge(greater_wins), fraction=0.5, max_calls_total=40)
    for step, (prompts, completions, out) in enumerate(recorder.calls):
        groups = [completions[g * K : (g + 1) * K] for g in range(2)]
        messages = [[{"role": "user", "content": prompts[g * K]}] for g in range(2)]  # as the RLOO module has them
        s, u = score_groups(pm, encoder, messages, groups)
        ctx = RewardContext(messages, groups, s.clone(), u, s.clone(), torch.zeros_like(s, dtype=torch.bool))
        trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=step)
        callback.on_pairwise_scores(trainer, None, ctx)
        callback.on_before_rewards(trainer, None, ctx)
        expected = pairwise_rewards(ctx.scores).flatten().tolist()
        assert out == pytest.approx(expected, abs=1e-6)  # the same PM batches twice: CPU float32 rounding at most
    assert rewards.decision.ledger.calls == callback.ledger.calls == 3 * 2 * 3  # half of 2 groups x 6 pairs


def test_routing_state_is_saved_with_checkpoints_and_restored_on_resume(tmp_path, tiny_model_dir, tiny_pm):
    pm, encoder = tiny_pm

    def function():
        return RoutedRewardFunction(RoutedRewards(pm, encoder, build_decision(FunctionJudge(greater_wins), fraction=0.5)),
                                    num_generations=K)

    first = function()
    train(tiny_model_dir, tmp_path / "out", first, max_steps=2)
    saved = json.loads((tmp_path / "out" / "checkpoint-2" / STATE_FILE).read_text())
    assert saved["decision"]["ledger"]["calls"] == 2 * 6 == first.rewards.decision.ledger.calls
    resumed = function()
    train(tiny_model_dir, tmp_path / "out", resumed, max_steps=3, resume=str(tmp_path / "out" / "checkpoint-2"))
    assert resumed.rewards.decision.ledger.calls == 3 * 6  # two restored steps and one new
    assert resumed.rewards.batches == 3


def test_a_judge_that_always_fails_leaves_the_pm_rewards(tiny_pm):
    pm, encoder = tiny_pm

    def broken(prompt, a, b):
        raise TimeoutError("judge down")

    rewards = RoutedRewards(pm, encoder, build_decision(FunctionJudge(broken), fraction=1.0))
    function = RoutedRewardFunction(rewards, num_generations=3)
    prompts = ["p"] * 3 + ["q"] * 3
    completions = ["a", "bb", "ccc", "x", "yy", "zzz"]
    logged: dict = {}
    out = function(prompts, completions, log_metric=logged.__setitem__)
    s, _ = score_groups(pm, encoder, ["p", "q"], [["a", "bb", "ccc"], ["x", "yy", "zzz"]])
    assert out == pytest.approx(pairwise_rewards(s).flatten().tolist(), abs=1e-6)
    assert all(math.isfinite(r) for r in out) and any(r != 0 for r in out)
    assert logged["lit_route/judge/failures"] == 6 and logged["lit_route/judge/fraction"] == 0.0


def test_a_group_split_across_processes_is_refused_and_lone_completions_get_zero():
    function = RoutedRewardFunction(rewards=None, num_generations=4)
    with pytest.raises(ValueError, match=r"num_generations: samples 0\.\.2 share a prompt but are 3"):
        function(["p", "p", "p"], ["a", "b", "c"])
    logged: dict = {}
    assert function(["p", "q"], ["a", "b"], log_metric=logged.__setitem__) == [0.0, 0.0]  # num_generations_eval=1
    assert logged == {"lit_route/singletons": 2.0}


def test_routed_reward_factory_with_a_verdict_cache(tmp_path):
    """The documented entry point: a PM (here untrained, on the tiny backbone), a judge, a cache; the same batch
    a second time is answered from the cache, billed nothing, and gets the same rewards."""
    from lit_route.integrations.trl import routed_reward

    judge = FunctionJudge(greater_wins)
    reward = routed_reward(judge=judge, pm_backbone=BackboneSpec(), num_generations=3, fraction=1.0, order="both",
                           cache=str(tmp_path / "cache.sqlite"))  # both display orders: the same requests each time
    prompts, completions = ["p"] * 3, ["a", "c", "b"]
    first = reward(prompts, completions)
    assert first == pytest.approx(hand_rewards(completions), abs=1e-6)
    assert reward(prompts, completions) == first and judge.stats.billed == 6  # 3 pairs x 2 orders, once
    assert reward.rewards.stats()["cached"] == 6 and reward.rewards.stats()["billed"] == 6


def test_the_trainer_step_reaches_the_decision_for_spend_pacing(tiny_pm):
    """A spend target paces over optimiser steps: the decision must get TRL's global_step as ``step`` (and the
    time between batches as ``step_seconds``), not one in place of the other."""
    pm, encoder = tiny_pm
    decision = build_decision(FunctionJudge(greater_wins), fraction=0.5)
    seen = []
    route = decision.route

    def spy(d, u, key, step=None, step_seconds=0.0):
        seen.append((key, step, step_seconds))
        return route(d, u, key, step=step, step_seconds=step_seconds)

    decision.route = spy
    function = RoutedRewardFunction(RoutedRewards(pm, encoder, decision), num_generations=2)
    for global_step in (7, 8):
        function(["p", "p"], ["a", "b"], trainer_state=SimpleNamespace(global_step=global_step))
    assert [(key, step) for key, step, _ in seen] == [(0, 7), (1, 8)]
    assert seen[0][2] == 0.0 and seen[1][2] >= 0.0


class RaisingJudge:
    """A backend whose calls raise (a locked cache, a local model out of memory), not merely fail."""

    name, model = "raising", "r"

    def __init__(self):
        from lit_route.judges.base import JudgeStats

        self.stats = JudgeStats()

    async def judge(self, requests):
        raise MemoryError("judge model out of memory")


def test_a_judge_that_raises_keeps_pm_rewards_then_stops_training(tiny_pm):
    from lit_route.integrations.trl import routed_reward

    pm, encoder = tiny_pm
    function = routed_reward(judge=RaisingJudge(), pm_backbone=BackboneSpec(), num_generations=2, fraction=1.0,
                             max_consecutive_errors=1)
    function.rewards.pm, function.rewards.encoder = pm, encoder
    s, _ = score_groups(pm, encoder, ["p"], [["a", "b"]])
    logged: dict = {}
    assert function(["p", "p"], ["a", "b"], log_metric=logged.__setitem__) == pytest.approx(
        pairwise_rewards(s)[0].tolist(), abs=1e-6)  # the first batch: PM rewards, the error counted
    assert logged["lit_route/judge/errors"] == 1.0 and logged["lit_route/judge/failures"] == 1.0
    with pytest.raises(RuntimeError, match=r"the judge raised in 2 consecutive batches \(max_consecutive_errors=1\)"):
        function(["p", "p"], ["a", "b"])


def test_conversational_batches_score_as_their_text(tiny_pm):
    """TRL's conversational format (prompts and completions as message lists) gives the rewards of the same
    single-turn texts: the PM reads a text prompt as one user turn, the judge the message's content."""
    pm, encoder = tiny_pm

    def function():
        decision = build_decision(FunctionJudge(greater_wins), fraction=0.5, order="fixed")
        return RoutedRewardFunction(RoutedRewards(pm, encoder, decision), num_generations=3)

    texts = ["short", "a longer answer", "mid one"]
    chat_prompt = [{"role": "user", "content": "Say something."}]
    chat = function()([chat_prompt] * 3, [[{"role": "assistant", "content": t}] for t in texts])
    plain = function()(["Say something."] * 3, texts)
    assert chat == pytest.approx(plain, abs=1e-6)  # the same sequences: float rounding at most


def test_importing_trl_after_the_integration_drops_only_trls_vllm_notice():
    """With vLLM 0.32 installed (lit-route[vllm]) TRL warns five times as it imports that it supports vLLM 0.22 to
    0.31; after ``lit_route.integrations.trl`` that notice is gone and other warnings still show. (Where no vLLM
    outside TRL's range is installed there is no notice to drop and the test checks the rest.)"""
    code = ("import warnings\nimport lit_route.integrations.trl\nfrom trl import GRPOTrainer, RLOOTrainer\n"
            "warnings.warn('another notice', UserWarning)\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, env=env,
                          timeout=600, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "TRL currently supports vLLM" not in done.stderr and "another notice" in done.stderr, done.stderr[-2000:]
