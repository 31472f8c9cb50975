"""Verifiers of the ``constraints`` task, in the shapes the judges and the evaluation call them.

``judge_pair`` is the callable a :class:`~lit_route.judges.FunctionJudge` takes
(``function: lit_route.tasks.verify:judge_pair``): it prefers the response that satisfies the prompt's
constraint; both or neither is a tie. A prompt that is not of this task raises, which the judge counts as a
failed call.
"""

from __future__ import annotations

from lit_route.tasks.constraints import parse_prompt


def passes(prompt: str, response: str) -> bool:
    """Whether ``response`` satisfies the constraint stated in ``prompt``."""
    return parse_prompt(prompt).check(response)


def judge_pair(prompt: str, response_a: str, response_b: str) -> str:
    """``"A"`` when only A satisfies the constraint, ``"B"`` when only B does, else ``"tie"``."""
    constraint = parse_prompt(prompt)
    a, b = constraint.check(response_a), constraint.check(response_b)
    if a == b:
        return "tie"
    return "A" if a else "B"
