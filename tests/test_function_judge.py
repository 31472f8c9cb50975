"""``FunctionJudge``: sync and async callables by import path, statistics, cache, failures that stay failures."""

import asyncio
import sys
import textwrap

import pytest

from lit_route.judges import CachedJudge, FunctionJudge, judge_pairs, run_sync
from lit_route.judges.function import import_callable
from lit_route.types import JudgeRequest, Preference

ADD = "What is 3 + 4?"
REQS = [
    JudgeRequest(ADD, "3 + 4 = 7", "It is 8."),  # only A is right
    JudgeRequest(ADD, "eight", "The answer is 7."),  # only B
    JudgeRequest(ADD, "7", "7!"),  # both: tie
]


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's own judge functions, importable by path."""
    (tmp_path / "my_judges.py").write_text(textwrap.dedent('''
        import asyncio
        CALLS = []

        def longer(prompt, a, b):
            CALLS.append((prompt, a, b))
            return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "TIE"

        async def shorter(prompt, a, b):
            await asyncio.sleep(0.01)
            return "b" if len(a) > len(b) else " a " if len(b) > len(a) else "tie"

        def broken(prompt, a, b):
            CALLS.append((prompt, a, b))
            return 1 / 0

        def undecided(prompt, a, b):
            return "maybe"

        async def slow(prompt, a, b):
            await asyncio.sleep(5)
            return "A"

        class Counter:
            in_flight = peak = 0

            async def __call__(self, prompt, a, b):
                Counter.in_flight += 1
                Counter.peak = max(Counter.peak, Counter.in_flight)
                await asyncio.sleep(0.02)
                Counter.in_flight -= 1
                return "A"

        counter = Counter()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_judges", None)
    yield __import__("my_judges")
    sys.modules.pop("my_judges", None)


def test_sync_verifier_by_import_path_gives_verdicts_and_stats():
    judge = FunctionJudge("lit_route.tasks.verify:judge_pair")
    verdicts = run_sync(judge.judge(REQS))
    assert [v.preference for v in verdicts] == [Preference.A, Preference.B, Preference.TIE]
    assert all(v.ok and v.failure is None and v.latency_s >= 0 for v in verdicts)
    summary = judge.stats.summary()
    assert summary["verdicts"] == summary["requests"] == summary["billed"] == 3 and summary["failed"] == 0
    assert len(judge.stats.latencies) == 3
    assert judge.model == "lit_route.tasks.verify:judge_pair" and judge.name == "function"


def test_dotted_path_and_callable_object_work_too(user_module):
    by_dots = FunctionJudge("my_judges.longer")
    direct = FunctionJudge(user_module.longer, model="longer-v1")
    for judge in (by_dots, direct):
        (v,) = run_sync(judge.judge([JudgeRequest("p", "long answer", "short")]))
        assert v.preference is Preference.A and v.raw == "A"
    assert direct.model == "longer-v1" and by_dots.model == "my_judges.longer"


def test_async_callable_verdicts_are_normalised(user_module):
    judge = FunctionJudge("my_judges:shorter")
    verdicts = run_sync(judge.judge([JudgeRequest("p", "xx", "x"), JudgeRequest("p", "x", "xx"),
                                     JudgeRequest("p", "x", "y")]))
    assert [v.preference for v in verdicts] == [Preference.B, Preference.A, Preference.TIE]
    assert judge.stats.verdicts == judge.stats.billed == 3


def test_raising_callable_is_a_counted_failure_never_a_verdict(user_module):
    judge = FunctionJudge("my_judges:broken")
    verdicts = run_sync(judge.judge(REQS[:2]))
    assert all(v.preference is None and v.failure == "error:ZeroDivisionError" for v in verdicts)
    assert "division by zero" in verdicts[0].raw
    summary = judge.stats.summary()
    assert summary["failures"] == {"error:ZeroDivisionError": 2}
    assert summary["requests"] == 2 and summary["billed"] == 0  # no answer came back: sent, not billed
    # through the pairwise layer a failure stays a failure: no score, no tie
    (jd,) = run_sync(judge_pairs(judge, [("p", "x", "y")], order="both"))
    assert jd.score is None and jd.failure == "error:ZeroDivisionError"


def test_unknown_prompt_makes_the_task_verifier_fail():
    judge = FunctionJudge("lit_route.tasks.verify:judge_pair")
    (v,) = run_sync(judge.judge([JudgeRequest("Tell me a joke.", "a", "b")]))
    assert v.preference is None and v.failure == "error:ValueError" and "constraints task" in v.raw


def test_invalid_return_and_timeout_are_failures(user_module):
    (v,) = run_sync(FunctionJudge("my_judges:undecided").judge(REQS[:1]))
    assert v.preference is None and v.failure == "invalid_verdict" and v.raw == "'maybe'" and v.billed == 1
    judge = FunctionJudge("my_judges:slow", timeout_s=0.05)
    (v,) = run_sync(judge.judge(REQS[:1]))
    assert v.preference is None and v.failure == "timeout" and judge.stats.failures["timeout"] == 1


def test_concurrency_is_bounded(user_module):
    judge = FunctionJudge("my_judges:counter", max_concurrency=3)
    verdicts = run_sync(judge.judge([JudgeRequest("p", str(i), "b") for i in range(12)]))
    assert all(v.preference is Preference.A for v in verdicts)
    assert user_module.Counter.peak == 3


def test_cache_pays_each_request_once_and_never_caches_failures(user_module, tmp_path):
    cached = CachedJudge(FunctionJudge("my_judges:longer"), str(tmp_path / "cache.sqlite"))
    first = run_sync(cached.judge([JudgeRequest("p", "aa", "b"), JudgeRequest("p", "aa", "b")]))
    assert len(user_module.CALLS) == 1 and first[0].preference is first[1].preference is Preference.A
    again = CachedJudge(FunctionJudge("my_judges:longer"), str(tmp_path / "cache.sqlite"))
    (v,) = run_sync(again.judge([JudgeRequest("p", "aa", "b")]))
    assert v.cached and v.preference is Preference.A and len(user_module.CALLS) == 1
    assert again.stats.cached == 1 and again.stats.verdicts == again.stats.requests == 0
    # another function (another model name) does not read these verdicts; a failure is not stored
    broken = CachedJudge(FunctionJudge("my_judges:broken"), str(tmp_path / "cache.sqlite"))
    for _ in range(2):
        (v,) = run_sync(broken.judge([JudgeRequest("p", "aa", "b")]))
        assert v.preference is None and not v.cached
    assert len(user_module.CALLS) == 3 and broken.stats.summary()["failed"] == 2


@pytest.mark.parametrize("path, message", [
    ("no_such_module_xyz:f", "cannot import module"),
    ("lit_route.tasks.verify:nope", "has no attribute"),
    ("lit_route.tasks.constraints:FAMILIES", "not callable"),
    ("justaname", "expected 'package.module:name'"),
])
def test_bad_import_paths_name_the_problem(path, message):
    with pytest.raises(ValueError, match=message):
        import_callable(path)


def test_options_are_validated():
    with pytest.raises(ValueError, match="max_concurrency"):
        FunctionJudge("lit_route.tasks.verify:judge_pair", max_concurrency=0)
    with pytest.raises(ValueError, match="timeout_s"):
        FunctionJudge("lit_route.tasks.verify:judge_pair", timeout_s=0)


def test_cache_key_names_the_function():
    judge = FunctionJudge("lit_route.tasks.verify:judge_pair", model="v2")
    assert judge.identity() == {"backend": "function", "model": "v2", "function": "lit_route.tasks.verify:judge_pair"}


def test_works_on_a_new_event_loop_each_time():
    judge = FunctionJudge("lit_route.tasks.verify:judge_pair", max_concurrency=1)
    for _ in range(2):  # the routing callback may run each step on a fresh loop
        assert asyncio.run(judge.judge(REQS[:1]))[0].preference is Preference.A
