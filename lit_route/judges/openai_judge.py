"""``OpenAICompatibleJudge``: any OpenAI-compatible chat server (vLLM, llama.cpp, DeepSeek, OpenAI)."""

from __future__ import annotations

from collections.abc import Sequence

from lit_route.judges.base import JudgeStats
from lit_route.judges.limits import CallPolicy, RateLimits, RetryableError
from lit_route.judges.prompt import PromptFormat
from lit_route.judges.remote import Completion, classify_sdk_error, run_requests
from lit_route.judges.secrets import read_api_key
from lit_route.types import JudgeRequest, Verdict


class OpenAICompatibleJudge:
    """A judge behind the Chat Completions API, through the official ``openai`` SDK.

    Reasoning models are handled: a separate ``reasoning_content`` (DeepSeek, vLLM) is never parsed, and
    inline ``<think>...</think>`` is cut off before the verdict is read.

    Args:
        model: Model name as the server knows it.
        base_url: Server URL, e.g. ``http://localhost:8000/v1`` (vLLM) or ``https://api.deepseek.com``.
        max_tokens: Output token limit.
        temperature: Sampling temperature.
        api_key_env: Environment variable holding the key (local servers accept any key).
        api_key_file: A file holding the key (used when the variable is unset).
        require_key: Fail when no key is found (set ``False`` for local servers).
        policy: Rate limits, retries and prices.
        prompt: The prompt template and verdict syntax (``None``: the built-in ones; see
            :class:`~lit_route.judges.prompt.PromptFormat`).
    """

    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        api_key_env: str = "OPENAI_API_KEY",
        api_key_file: str | None = None,
        require_key: bool = True,
        policy: CallPolicy | None = None,
        prompt: PromptFormat | None = None,
    ):
        try:
            import openai
        except ImportError as err:
            raise ImportError("OpenAICompatibleJudge needs the openai SDK: pip install 'lit-route[openai]'") from err
        self._sdk = openai
        self.model, self.base_url = model, base_url
        self.max_tokens, self.temperature = max_tokens, temperature
        self.policy = policy or CallPolicy()
        self.prompt = prompt or PromptFormat()
        self.stats = JudgeStats()
        self._limits = RateLimits(self.policy)
        key = read_api_key(api_key_env, api_key_file, "OpenAICompatibleJudge", required=require_key)
        self._client = openai.AsyncOpenAI(
            api_key=key or "not-needed", base_url=base_url, max_retries=0, timeout=self.policy.timeout_s
        )

    def __repr__(self) -> str:
        return f"OpenAICompatibleJudge(model={self.model!r}, base_url={self.base_url!r})"

    def identity(self) -> dict:
        """Every setting that changes the answer (the verdict cache keys on it); never the key."""
        return {"backend": self.name, "model": self.model, "base_url": self.base_url, "max_tokens": self.max_tokens,
                "temperature": self.temperature, **self.prompt.identity()}

    async def complete(self, system: str, user: str) -> Completion:
        response = await self._client.chat.completions.create(
            model=self.model,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
            max_tokens=self.max_tokens,
            temperature=self.temperature,
        )
        choices = getattr(response, "choices", None)
        message = getattr(choices[0], "message", None) if choices else None
        if message is None:
            raise RetryableError("malformed_response", None, "no choices in the response")
        text = getattr(message, "content", None) or ""  # reasoning_content, if any, is not the answer
        usage = getattr(response, "usage", None)
        return Completion(
            text,
            getattr(usage, "prompt_tokens", 0) or 0,
            getattr(usage, "completion_tokens", 0) or 0,
            truncated=getattr(choices[0], "finish_reason", None) == "length",
        )

    def classify(self, err: BaseException) -> Exception:
        return classify_sdk_error(self._sdk, err)

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        return await run_requests(requests, self.complete, self.classify, self.policy, self._limits, self.stats,
                                  self.prompt)
