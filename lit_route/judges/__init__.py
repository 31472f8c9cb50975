"""Judge backends behind one protocol, the pairwise prompt and parser, caching and display-order control.

Backends whose SDK is optional (``anthropic``, ``openai``) import it when constructed, with an install hint.
"""

from lit_route.judges.base import JudgeBackend, JudgeStats
from lit_route.judges.cache import CachedJudge
from lit_route.judges.limits import CallAllowance, CallPolicy
from lit_route.judges.loop import run_sync, submit
from lit_route.judges.pairwise import PairJudgement, judge_pairs
from lit_route.judges.prompt import PROMPT_VERSION, PromptFormat, parse_verdict, render
from lit_route.judges.replay import ReplayJudge

__all__ = [
    "PROMPT_VERSION",
    "AnthropicJudge",
    "CachedJudge",
    "CallAllowance",
    "CallPolicy",
    "FunctionJudge",
    "HFLocalJudge",
    "JudgeBackend",
    "JudgeStats",
    "OpenAICompatibleJudge",
    "PairJudgement",
    "PromptFormat",
    "ReplayJudge",
    "judge_pairs",
    "parse_verdict",
    "render",
    "run_sync",
    "submit",
]


def __getattr__(name: str):
    if name == "AnthropicJudge":
        from lit_route.judges.anthropic_judge import AnthropicJudge

        return AnthropicJudge
    if name == "OpenAICompatibleJudge":
        from lit_route.judges.openai_judge import OpenAICompatibleJudge

        return OpenAICompatibleJudge
    if name == "FunctionJudge":
        from lit_route.judges.function import FunctionJudge

        return FunctionJudge
    if name == "HFLocalJudge":
        from lit_route.judges.hf_local import HFLocalJudge

        return HFLocalJudge
    raise AttributeError(name)
