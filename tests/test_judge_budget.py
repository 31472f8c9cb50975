"""The routing budget holds what the judge server bills: re-asks stay under the per-step cap, and a run resumed
from a checkpoint older than its last paid calls is charged for them."""

import lightning as L
import pytest
import torch
from loopback import Loopback, Reply, longer_is_better

from lit_route.callbacks import UncertaintyRouting
from lit_route.judges import CachedJudge, CallAllowance, CallPolicy, run_sync
from lit_route.judges.limits import REASK_ALLOWANCE
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.routing.budget import BudgetLedger
from lit_route.types import JudgeRequest

POLICY = dict(max_attempts=3, timeout_s=10.0, backoff_base_s=0.01, backoff_max_s=0.1, deadline_s=30)


def judge(url: str, **policy) -> OpenAICompatibleJudge:
    return OpenAICompatibleJudge("judge", base_url=f"{url}/v1", require_key=False,
                                 policy=CallPolicy(**{**POLICY, **policy}))


def test_reasks_draw_on_the_allowance_and_stop_when_it_is_spent():
    async def ask(backend, allowance):
        REASK_ALLOWANCE.set(allowance)
        return await backend.judge([JudgeRequest(f"q{i}", "x", "y") for i in range(3)])

    with Loopback(Reply("Both are fine, I cannot choose.")) as server:
        allowance = CallAllowance(1)
        verdicts = run_sync(ask(judge(server.url, unparseable_retries=2), allowance))
    assert server.completions == 4  # 3 first answers, 1 re-ask; without an allowance: 9
    assert all(v.failure == "unparseable" for v in verdicts) and sum(v.billed for v in verdicts) == 4
    assert allowance.left == 0 and allowance.refused == 3  # two pairs refused their first re-ask, one its second


def test_the_per_step_cap_holds_with_reasks_of_unusable_answers(tmp_path):
    from test_rloo import build

    with Loopback(answer=longer_is_better) as server:
        # the first answer of every pair is unusable; the re-ask is fine
        server.script = [Reply("I cannot tell which is better.")] * 3
        cb = UncertaintyRouting(judge(server.url), fraction=0.5, max_calls_per_step=4)
        build(tmp_path, [cb], max_steps=1)
        billed = server.completions
    # 2 prompts x 3 pairs, half routed: 3 pairs, 1 call left for one re-ask
    assert billed == 4 == cb.ledger.calls  # before: 6 billed under a cap of 4
    assert cb.failures == {"unparseable": 2}


def test_a_resumed_run_is_charged_for_calls_paid_after_its_checkpoint(tmp_path):
    from test_rloo import build

    def run(url, steps, ckpt=None):
        backend = CachedJudge(judge(url), tmp_path / "cache.sqlite")
        cb = UncertaintyRouting(backend, fraction=0.5)
        saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
        build(tmp_path, [cb, saver], max_steps=steps, ckpt=ckpt)
        return cb

    with Loopback(answer=longer_is_better) as server:
        run(server.url, 3)
        # as if killed after step 3 paid its calls but before its checkpoint was written
        step2 = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
        resumed = run(server.url, 4, ckpt=str(step2))
        billed = server.completions
    # 3 routed pairs a step; step 3 is served from the cache on resume, step 4 paid
    assert billed == 12 and resumed.ledger.calls == billed  # before: 9 charged
    state = torch.load(tmp_path / "ckpt" / "epoch=0-step=4.ckpt", weights_only=False)
    routing = next(v for k, v in state["callbacks"].items() if "UncertaintyRouting" in k)
    assert routing["ledger"]["calls"] == 12 and routing["run_id"] == resumed.run_id


def test_reconcile_only_raises_the_ledger():
    ledger = BudgetLedger(max_calls_total=10)
    ledger.charge(5, 0.5)
    assert ledger.reconcile(7, 0.7) == 2 and (ledger.calls, ledger.spend_usd) == (7, pytest.approx(0.7))
    assert ledger.reconcile(3, 0.1) == 0 and ledger.calls == 7 and ledger.allowance() == 3
