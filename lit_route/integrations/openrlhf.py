"""OpenRLHF's remote reward-model protocol: the request and response bodies, and the response inside a query.

OpenRLHF (``--reward.remote_url`` since 0.10.2, ``--remote_rm_url`` before) POSTs JSON to the URL it is
given::

    {"query": [full text of prompt + response, special tokens kept], "prompts": [prompt text], "labels": [...]}

and reads ``rewards`` (one per query) from the answer; ``scores`` (dynamic filtering) and ``extra_logs``
(per-sample logged values) are read when present, as OpenRLHF's own ``serve_rm`` returns them. Up to 0.9.0 one
request carries a rollout batch (``n_samples_per_prompt`` samples of each prompt one after another); from 0.9.1
each sample is its own request, so a group only exists across requests (see :mod:`lit_route.integrations.server`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# the prompt as OpenRLHF sends it with --apply_chat_template: ChatML (Qwen, SmolLM) or Llama 3 turns, ending with
# the assistant's open header
_CHATML = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>\s*", re.S)
_CHATML_OPEN = re.compile(r"<\|im_start\|>assistant\s*$")
_LLAMA3 = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>", re.S)
_LLAMA3_OPEN = re.compile(r"<\|start_header_id\|>assistant<\|end_header_id\|>\s*$")


def chat_messages(prompt: str) -> list[dict] | None:
    """The conversation inside a chat-templated prompt (ChatML or Llama 3), or ``None`` when ``prompt`` is not
    one whole templated conversation. The PM then renders it with its own template, as in training, instead of
    reading the policy's template as text."""
    for turn, open_header, prefix in ((_CHATML, _CHATML_OPEN, ""), (_LLAMA3, _LLAMA3_OPEN, "<|begin_of_text|>")):
        text = prompt.removeprefix(prefix)
        end = open_header.search(text)
        if end is None:
            continue
        body, messages, pos = text[: end.start()], [], 0
        for match in turn.finditer(body):
            if match.start() != pos:
                return None
            messages.append({"role": match.group(1), "content": match.group(2)})
            pos = match.end()
        if messages and pos == len(body):
            return messages
    return None


@dataclass(frozen=True)
class Sample:
    """One rollout sample: the prompt (as sent: samples of one prompt are grouped by it), the policy's response,
    the optional label, and ``context``: the prompt as the PM and the judge read it (chat messages when the
    prompt is a templated conversation, else the text)."""

    prompt: str
    response: str
    label: object = None
    context: object = field(default=None, compare=False)


def split_query(query: str, prompt: str, strip: tuple[str, ...] = ()) -> tuple[str, bool]:
    """The response inside ``query`` (the decoded prompt + response) and whether the prompt was found in it.

    OpenRLHF decodes the whole sequence, so the query starts with the prompt as the tokenizer renders it back; a
    BOS token or normalised spaces can make the two differ at the start, so the prompt's first occurrence is used
    when the query does not start with it (a response that repeats the prompt keeps its whole text); failing that, the query is matched to the prompt less its first few
    characters (a BOS the query lacks), and last the part after the longest common prefix is taken (the second
    value is then ``False``, and the server counts it). End-of-turn markers listed in ``strip`` (the policy's
    EOS text, e.g. ``<|im_end|>``) are removed from the response's end, repeatedly.
    """
    if query.startswith(prompt):
        response, found = query[len(prompt) :], True
    elif prompt and (at := query.find(prompt)) >= 0:
        response, found = query[at + len(prompt) :], True
    elif (k := next((k for k in range(1, min(len(prompt), 64)) if query.startswith(prompt[k:])), None)) is not None:
        response, found = query[len(prompt) - k :], False  # the query lost the prompt's first characters (a BOS)
    else:
        n = 0
        while n < min(len(query), len(prompt)) and query[n] == prompt[n]:
            n += 1
        response, found = query[n:], False
    while strip:  # "answer<|im_end|>\n<pad>" -> "answer"
        tail = response.rstrip()
        marker = next((m for m in strip if m and tail.endswith(m)), None)
        if marker is None:
            break
        response = tail[: -len(marker)]
    return response, found


class RequestError(ValueError):
    """A request that does not follow the protocol or exceeds the server's bounds, answered with ``status`` (400,
    or 413 for a body over its size limit) and this message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _check_text(name: str, values: list[str]) -> None:
    # json.loads accepts "\ud800" (a lone surrogate): a str no tokenizer, no HTTP client can encode
    for i, text in enumerate(values):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RequestError(f"{name}[{i}]: not valid Unicode ({err.reason} at character {err.start})") from None


def parse_request(body: object, strip: tuple[str, ...] = (), unwrap_chat: bool = True) -> tuple[list[Sample], int]:
    """The samples of one request body and how many prompts were not found in their query. With
    ``unwrap_chat``, a chat-templated prompt is read as its messages (:func:`chat_messages`).

    Raises:
        RequestError: naming the field, when ``query`` or ``prompts`` is missing, not a list of strings (of valid
            Unicode), or when the lists' lengths differ.
    """
    if not isinstance(body, dict):
        raise RequestError("body: expected a JSON object with 'query' and 'prompts'")
    queries, prompts, labels = body.get("query"), body.get("prompts"), body.get("labels")
    for name, value in (("query", queries), ("prompts", prompts)):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RequestError(f"{name}: expected a list of strings")
        _check_text(name, value)
    if len(prompts) != len(queries):
        raise RequestError(f"prompts: {len(prompts)} prompts for {len(queries)} queries")
    if labels is None:
        labels = [None] * len(queries)
    if not isinstance(labels, list) or len(labels) != len(queries):
        raise RequestError(f"labels: expected a list of {len(queries)} labels")
    samples, missing = [], 0
    for query, prompt, label in zip(queries, prompts, labels, strict=True):
        response, found = split_query(query, prompt, strip)
        missing += not found
        context = (chat_messages(prompt) if unwrap_chat else None) or prompt
        samples.append(Sample(prompt, response, label, context))
    return samples, missing


def response_body(rewards: list[float], pm_rewards: list[float], judged: list[int]) -> dict:
    """The answer: ``rewards`` and ``scores`` (the same values, as OpenRLHF's own reward server sends them) and
    per-sample ``extra_logs`` (the PM-only reward and how many of the sample's pairs a judge decided)."""
    return {"rewards": rewards, "scores": rewards,
            "extra_logs": {"pm_reward": pm_rewards, "judged_pairs": judged}}
