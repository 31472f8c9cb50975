"""What a run paid is charged once and in full across a crash: the write-ahead journal of judge calls (calls the
provider received and never answered to the killed process are charged at an estimated price), and each judge's
cache record reconciled with what the ledger charged that judge."""

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
from loopback import Loopback, longer_is_better

from lit_route.judges import CachedJudge, CallPolicy
from lit_route.judges.openai_judge import OpenAICompatibleJudge
from lit_route.judges.prompt import PromptFormat
from lit_route.judges.remote import estimate_tokens
from lit_route.routing.budget import BudgetLedger
from lit_route.routing.cascade import CascadeStage
from lit_route.routing.journal import PaidJournal
from lit_route.types import JudgeRequest

ROOT = Path(__file__).resolve().parents[1]
POLICY = dict(max_attempts=3, timeout_s=10.0, backoff_base_s=0.01, backoff_max_s=0.1, deadline_s=30)


def judge(url: str, model: str) -> OpenAICompatibleJudge:
    return OpenAICompatibleJudge(model, base_url=f"{url}/v1", require_key=False, policy=CallPolicy(**POLICY))


def run_cascade(tmp_path, url, steps, ckpt=None):
    """debug-sized RLOO: 6 pairs a step, the top 3 to a cached main judge, the next 2 to an uncached stage."""
    from test_rloo import build

    from lit_route.callbacks import UncertaintyRouting

    cb = UncertaintyRouting(CachedJudge(judge(url, "strong"), tmp_path / "cache.sqlite"), fraction=0.5,
                            cascade=[CascadeStage(judge(url, "cheap"), fraction=1 / 3)])
    saver = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1, save_top_k=-1)
    build(tmp_path, [cb, saver], max_steps=steps, ckpt=ckpt)
    return cb


def resumed_after_step_3(tmp_path, drop_journal=False):
    """3 steps, then a resume from the step-2 checkpoint (as if killed after step 3 paid its calls and before its
    checkpoint) to step 4; returns the resumed callback and what the judge server billed."""
    with Loopback(answer=longer_is_better) as server:
        run_cascade(tmp_path, server.url, 3)
        assert server.billed == 3 * 5
        if drop_journal:  # a run folder moved, or a journal deleted: the caches' records are all that is left
            shutil.rmtree(tmp_path / "judge_journal")
        resumed = run_cascade(tmp_path, server.url, 4, ckpt=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
        return resumed, server.billed


def test_a_cached_judge_and_an_uncached_stage_are_each_charged_what_they_paid_after_the_checkpoint(tmp_path):
    resumed, billed = resumed_after_step_3(tmp_path)
    # step 3 again: the main judge's 3 verdicts come from its cache, the stage's 2 calls are paid again; step 4: 5
    assert billed == 15 + 2 + 5
    # the step-3 calls of the first process are charged from the journal, the cache's record has nothing more
    assert resumed.ledger.calls == billed  # before: 17, the cache's 9 records compared with both judges' 10 calls
    assert resumed.ledger.by_judge == [[12, 0.0], [10, 0.0]]


def test_without_the_journal_each_cache_is_reconciled_with_its_own_judge(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lit_route.routing.journal")
    resumed, billed = resumed_after_step_3(tmp_path, drop_journal=True)
    assert billed == 22
    # the main judge's 3 step-3 calls are found in its cache's record; the uncached stage's 2 have no record
    assert resumed.ledger.calls == billed - 2  # before: 17 (9 recorded against the 10 both judges were charged)
    assert resumed.ledger.by_judge == [[12, 0.0], [8, 0.0]]
    assert "judge: 3 judge calls billed after the checkpoint were found in the verdict cache's spend record" in caplog.text
    assert "cascade[0]: no verdict cache and no journal of the earlier process" in caplog.text


def test_the_ledger_reconciles_each_judge_against_its_own_charges():
    ledger = BudgetLedger(max_calls_total=100)
    ledger.charge(10, 1.0, by_judge=[(6, 0.9), (4, 0.1)])
    # judge 0's record says 9 and 1.2: 3 calls and 0.3 are missing, 1 call of which the journal will charge
    assert ledger.reconcile(9, 1.2, judges=[0], pending=(1, 0.1)) == 2
    assert ledger.calls == 12 and ledger.by_judge[0] == [8, pytest.approx(1.1)] and ledger.by_judge[1] == [4, 0.1]
    assert ledger.spend_usd == pytest.approx(1.2)  # 1.0 + the 0.2 neither the ledger nor the journal holds
    assert ledger.reconcile(5, 0.5, judges=[1]) == 1 and ledger.by_judge[1] == [5, pytest.approx(0.5)]
    # a state saved before the split: the ledger cannot tell a judge's charges, only its totals
    old = BudgetLedger()
    old.load_state_dict({"calls": 10, "spend_usd": 1.0, "failures": 0})
    assert old.by_judge is None and old.reconcile(9, 1.2, judges=[0]) is None and old.calls == 10
    assert old.reconcile(12, 1.5) == 2 and old.state_dict()["by_judge"] is None
    again = BudgetLedger()
    again.load_state_dict(ledger.state_dict())
    assert again.by_judge == ledger.by_judge


CLIENT = textwrap.dedent("""
    import sys
    from lit_route.judges import CallPolicy, run_sync
    from lit_route.judges.openai_judge import OpenAICompatibleJudge
    from lit_route.routing.journal import PaidJournal
    from lit_route.types import JudgeRequest

    url, path = sys.argv[1:]
    policy = CallPolicy(timeout_s=600, price_input_per_mtok=3.0, price_output_per_mtok=15.0)
    journal = PaidJournal(path)
    metered = journal.meter(OpenAICompatibleJudge("judge", base_url=url + "/v1", require_key=False, policy=policy),
                            key=7, index=1)
    run_sync(metered.judge([JudgeRequest("q0", "a", "b")]))  # answered: its line is written before it returns
    run_sync(metered.judge([JudgeRequest("q1", "a", "b"), JudgeRequest("q2", "a", "b")]))  # held, then killed
""")


def test_requests_in_flight_at_a_kill_are_charged_at_their_estimated_price(tmp_path, caplog):
    """A process killed while the provider holds two of its requests: both are billed and their answers lost.
    The journal wrote each down before sending it, so the next process charges them (one call each, at the judge's
    price for the rate limiter's token estimate) with the one call that was answered (at its billed tokens)."""
    (tmp_path / "client.py").write_text(CLIENT)
    path = tmp_path / "journal.jsonl"
    with Loopback(answer=longer_is_better) as server:
        server.hold(after=1)
        proc = subprocess.Popen([sys.executable, str(tmp_path / "client.py"), server.url, str(path)], cwd=ROOT,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert server.wait_held(2, timeout=120), "the client's second batch never reached the server"
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        billed = server.billed
    assert billed == 3 and server.completions == 1
    caplog.set_level(logging.WARNING, logger="lit_route.routing.journal")
    journal = PaidJournal(path)
    assert journal.load(lambda key: key == 7) == 3 and journal.lost == 2  # before: 1, the held calls unseen
    policy = CallPolicy(price_input_per_mtok=3.0, price_output_per_mtok=15.0)
    estimate = policy.cost(*estimate_tokens(*PromptFormat().render(JudgeRequest("q1", "a", "b"))))
    answered = policy.cost(100, 20)  # the loopback's usage block
    (calls_0, usd_0), (calls_1, usd_1) = journal.take(7)
    assert (calls_0, usd_0, calls_1) == (0, 0.0, 3)
    assert usd_1 == pytest.approx(answered + 2 * estimate, rel=1e-12)  # sums of a few floats
    assert "2 judge requests were in flight when an earlier process stopped" in caplog.text
    assert PaidJournal(path).load(lambda key: key != 7) == 0  # a batch already charged is not charged again


def test_a_judge_without_sent_lines_is_journaled_when_its_verdict_returns(tmp_path):
    """A function judge (no remote driver, no ``sent`` line): its billed verdicts are written as they return."""
    from lit_route.judges import FunctionJudge, run_sync

    journal = PaidJournal(tmp_path / "journal.jsonl")
    metered = journal.meter(FunctionJudge(lambda p, a, b: "A"), key=3, index=0)
    verdicts = run_sync(metered.judge([JudgeRequest(f"q{i}", "a", "b") for i in range(4)]))
    assert all(v.billed == 1 for v in verdicts)
    assert journal.take(3) == [(4, 0.0)]
    reread = PaidJournal(tmp_path / "journal.jsonl")
    assert reread.load(lambda key: True) == 4 and reread.lost == 0 and reread.pending(2) == [(4, 0.0), (0, 0.0)]


def test_old_journal_lines_still_count(tmp_path):
    """Lines without a judge index or call id (an older journal) count as the main judge's billed calls."""
    path = tmp_path / "journal.jsonl"
    path.write_text('{"key": 2, "billed": 3, "cost": 0.5}\n{"key": 2, "bil')  # the last line cut by a kill
    journal = PaidJournal(path)
    assert journal.load(lambda key: True) == 3 and journal.take(2) == [(3, 0.5)]
