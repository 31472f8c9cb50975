"""Pipelined rewards and the user's money: caps hold with batches in flight (spend, and re-asks of unusable
answers), and a fit that stops early trains on, and charges, the batches whose calls it paid for."""

import lightning as L
import pytest
import torch
from loopback import Loopback, Reply, longer_is_better
from test_routing_paths import unusable_first

from lit_route.callbacks import UncertaintyRouting
from lit_route.judges import CallPolicy
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import GenerationConfig

# the loopback reports 100 prompt tokens a call: at $10,000 per million input tokens a call costs $1
DOLLAR_A_CALL = dict(max_attempts=2, backoff_base_s=0.0, timeout_s=30.0, price_input_per_mtok=10_000.0)


def run(tmp_path, monkeypatch, server, steps, stages=2, callbacks=(), max_epochs=-1, prompts=16, **routing):
    """RLOO on tiny models, 2 prompts x 3 completions a batch (6 pairs, half routed), judged at the loopback."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    L.seed_everything(0)
    module = RLOOPolicyModule(policy=BackboneSpec(), lora=LoraSpec(r=4, alpha=8), pm_backbone=BackboneSpec(),
                              generation=GenerationConfig(num_samples=3, max_new_tokens=6), lr=1e-2,
                              reward_pipeline=stages)
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"Tell me about the number {i}." for i in range(prompts)))
    judge = OpenAICompatibleJudge("judge", base_url=f"{server.url}/v1",
                                  policy=CallPolicy(**{**DOLLAR_A_CALL, **routing.pop("policy", {})}))
    cb = UncertaintyRouting(judge, fraction=0.5, order="fixed", **routing)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = L.Trainer(max_steps=steps, max_epochs=max_epochs, accelerator="cpu", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb, ckpt, *callbacks],
                        default_root_dir=tmp_path)
    trainer.fit(module, PromptDataModule(prompts=str(path), batch_size=2))
    return module, cb, trainer, ckpt


def test_a_spend_cap_holds_in_a_pipelined_run(tmp_path, monkeypatch):
    """$1 a call, a $5 cap, 3 routed pairs a batch, two batches in flight: the calls in flight hold their
    estimated price, so the provider bills at most $5 (not a batch more per batch in flight)."""
    with Loopback(answer=longer_is_better) as server:
        _, cb, _, _ = run(tmp_path, monkeypatch, server, steps=6, max_spend_usd=5.0)
    assert 3 <= server.completions <= 5
    assert cb.ledger.calls == server.completions and cb.ledger.spend_usd == pytest.approx(server.completions)
    assert cb.decision.reserved == 0 and cb.decision.reserved_usd == 0.0  # nothing left held after the run


def test_reasks_stay_within_the_call_cap_in_a_pipelined_run(tmp_path, monkeypatch):
    """Every first answer is unusable and re-asked once: each batch in flight holds its re-asks against
    ``max_calls_total``, so two batches in flight cannot both be handed the same room."""
    with Loopback(answer=unusable_first()) as server:
        _, cb, _, _ = run(tmp_path, monkeypatch, server, steps=6, max_calls_total=10,
                          policy={"price_input_per_mtok": 0.0})
    assert 6 <= server.completions <= 10
    assert cb.ledger.calls == server.completions


class StopAt(L.Callback):
    """Sets ``trainer.should_stop`` at the end of a given batch (as EarlyStopping or max_time do) or epoch."""

    def __init__(self, batch: int | None = None, epoch: int | None = None):
        self.batch, self.epoch = batch, epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.batch is not None and pl_module.batches_sampled == self.batch:
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer, pl_module):
        if self.epoch is not None and trainer.current_epoch + 1 == self.epoch:
            trainer.should_stop = True


@pytest.mark.parametrize("stop", [StopAt(batch=5), StopAt(epoch=1)], ids=["should_stop", "epoch_end"])
def test_a_fit_that_stops_early_trains_on_and_charges_the_batches_it_paid_for(tmp_path, monkeypatch, stop):
    """Two batches in flight when the fit is stopped: they are waited for, trained on (counted as steps and in
    the last checkpoint) and charged, so the ledger equals what the provider billed."""
    with Loopback(answer=longer_is_better, default=Reply()) as server:
        module, cb, trainer, ckpt = run(tmp_path, monkeypatch, server, steps=40, max_epochs=3, prompts=8,
                                        callbacks=[stop])
    sampled = module.batches_sampled
    assert sampled == 5 if stop.batch else sampled == 4  # 8 prompts, 2 a batch: 4 batches an epoch
    assert len(module.pipeline) == 0 and not cb._inflight
    assert trainer.global_step == sampled  # every sampled batch trained on, once
    assert cb.ledger.calls == server.completions == 3 * sampled
    state = torch.load(ckpt.last_model_path, weights_only=False, map_location="cpu")
    routing = next(v for k, v in state["callbacks"].items() if "UncertaintyRouting" in k)
    assert state["global_step"] == sampled and routing["ledger"]["calls"] == server.completions
    assert not state["lit_route"]["pending"][0]


@pytest.mark.parametrize("sent", [False, True])
def test_restored_batches_reask_within_what_they_held(tmp_path, monkeypatch, sent):
    """A batch in flight in a checkpoint is asked again on resume within what it held when it was routed (a run
    cap of 4 calls for 3 planned calls: one re-ask), not with no limit; and when the killed process had sent its 3
    calls (the provider bills them, the journal charges them), only the one call left of the hold is asked again."""
    from types import SimpleNamespace

    from lit_route.policy.context import RewardContext

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    module = SimpleNamespace(device=torch.device("cpu"), hparams={"reward_pipeline": 2})
    trainer = SimpleNamespace(world_size=1, global_rank=0, global_step=0, default_root_dir=str(tmp_path))
    g = torch.Generator().manual_seed(0)
    upper = torch.randn(1, 3, 3, generator=g).triu(1)
    s, u = upper - upper.transpose(1, 2), torch.ones(1, 3, 3)

    def context():
        return RewardContext([[{"role": "user", "content": "Say a number."}]], [["1", "22", "333"]], s.clone(),
                             u.clone(), s.clone(), torch.zeros_like(s, dtype=torch.bool))

    def callback(url):
        judge = OpenAICompatibleJudge("judge", base_url=f"{url}/v1",
                                      policy=CallPolicy(max_attempts=1, timeout_s=30.0, unparseable_retries=1))
        return UncertaintyRouting(judge, fraction=1.0, order="fixed", max_calls_total=4)

    with Loopback(answer=unusable_first()) as first:
        first.hold()  # the killed process never read an answer
        killed = callback(first.url)
        killed.on_pairwise_scores(trainer, module, context())
        assert first.wait_held(3, timeout=30)  # all three requests were delivered (billed) before the kill
        state = killed.state_dict()
        assert state["inflight"][0][0]["reserved"] == {"calls": 3, "reasks": 1, "usd": 0.0}
        killed.teardown(trainer, module, "fit")
    if not sent:  # the kill came before any request left: no "sent" line in the journal
        for journal in (tmp_path / "judge_journal").glob("*.jsonl"):
            journal.write_text("".join(line for line in journal.read_text().splitlines(keepends=True)
                                       if '"sent"' not in line))
    with Loopback(answer=unusable_first()) as second:
        resumed = callback(second.url)
        resumed.load_state_dict(state)
        ctx = context()
        ctx.key = 0
        resumed.on_before_rewards(trainer, module, ctx)
    if sent:
        # before: 3 charged as lost and 4 asked again, 7 against a cap of 4
        assert second.completions == 1 and resumed.ledger.calls == 4  # 3 lost + the one call left of the hold
        assert int(ctx.judged.sum()) == 0 and resumed.failures["unparseable"] == 1
    else:
        assert second.completions == resumed.ledger.calls == 4  # 3 asks and the one re-ask the batch held
        assert int(ctx.judged.sum()) // 2 == 1 and resumed.failures["unparseable"] == 2
