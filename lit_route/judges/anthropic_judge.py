"""``AnthropicJudge``: Claude through the official ``anthropic`` SDK."""

from __future__ import annotations

from collections.abc import Sequence

from lit_route.judges.base import JudgeStats
from lit_route.judges.limits import CallPolicy, RateLimits, RetryableError
from lit_route.judges.prompt import PromptFormat
from lit_route.judges.remote import Completion, classify_sdk_error, run_requests
from lit_route.judges.secrets import read_api_key
from lit_route.types import JudgeRequest, Verdict


class AnthropicJudge:
    """A Claude judge. The API key is read from the environment (or a secrets file), never from a config.

    Args:
        model: Model name, e.g. ``claude-sonnet-4-5``.
        max_tokens: Output token limit (thinking included).
        temperature: Sampling temperature; ``None`` leaves it to the model (newer SDKs and models do not take
            one; a value is sent in the request body). Ignored with extended thinking.
        thinking_budget: Tokens of extended thinking; ``None`` disables it.
        base_url: Server URL override (a proxy or gateway speaking the Messages API).
        api_key_env: Environment variable holding the key.
        api_key_file: A file holding the key (used when the variable is unset).
        policy: Rate limits, retries and prices.
        prompt: The prompt template and verdict syntax (``None``: the built-in ones; see
            :class:`~lit_route.judges.prompt.PromptFormat`).
    """

    name = "anthropic"

    def __init__(
        self,
        model: str = "claude-sonnet-4-5",
        max_tokens: int = 1024,
        temperature: float | None = None,
        thinking_budget: int | None = None,
        base_url: str | None = None,
        api_key_env: str = "ANTHROPIC_API_KEY",
        api_key_file: str | None = None,
        policy: CallPolicy | None = None,
        prompt: PromptFormat | None = None,
    ):
        try:
            import anthropic
        except ImportError as err:
            raise ImportError("AnthropicJudge needs the anthropic SDK: pip install 'lit-route[anthropic]'") from err
        self._sdk = anthropic
        self.model, self.max_tokens, self.temperature = model, max_tokens, temperature
        self.thinking_budget = thinking_budget
        self.base_url = base_url
        self.policy = policy or CallPolicy()
        self.prompt = prompt or PromptFormat()
        self.stats = JudgeStats()
        self._limits = RateLimits(self.policy)
        self._client = anthropic.AsyncAnthropic(
            api_key=read_api_key(api_key_env, api_key_file, "AnthropicJudge"),
            base_url=base_url,
            max_retries=0,  # retries are ours: counted, rate-limited, Retry-After honoured
            timeout=self.policy.timeout_s,
        )

    def __repr__(self) -> str:  # never show the client (it holds the key)
        return f"AnthropicJudge(model={self.model!r})"

    def identity(self) -> dict:
        """Every setting that changes the answer (the verdict cache keys on it); never the key."""
        return {"backend": self.name, "model": self.model, "base_url": self.base_url, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "thinking_budget": self.thinking_budget, **self.prompt.identity()}

    async def complete(self, system: str, user: str) -> Completion:
        kwargs = {}
        if self.thinking_budget:
            kwargs["thinking"] = {"type": "enabled", "budget_tokens": self.thinking_budget}
        elif self.temperature is not None:
            kwargs["extra_body"] = {"temperature": self.temperature}
        message = await self._client.messages.create(
            model=self.model,
            max_tokens=self.max_tokens,
            system=system,
            messages=[{"role": "user", "content": user}],
            **kwargs,
        )
        content = getattr(message, "content", None)
        if not isinstance(content, list):
            raise RetryableError("malformed_response", None, "no content blocks in the response")
        # thinking blocks are reasoning; only text blocks are the final answer
        text = "".join(getattr(block, "text", "") or "" for block in content if getattr(block, "type", "") == "text")
        # a 200 answer without usage (some gateways strip it) is still an answer, and was billed: keep it
        usage = getattr(message, "usage", None)
        return Completion(text, getattr(usage, "input_tokens", 0) or 0, getattr(usage, "output_tokens", 0) or 0,
                          truncated=getattr(message, "stop_reason", None) == "max_tokens")

    def classify(self, err: BaseException) -> Exception:
        return classify_sdk_error(self._sdk, err)

    async def judge(self, requests: Sequence[JudgeRequest]) -> list[Verdict]:
        return await run_requests(requests, self.complete, self.classify, self.policy, self._limits, self.stats,
                                  self.prompt)
