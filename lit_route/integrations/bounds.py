"""What one request to ``lit-route serve`` may ask for: its body's size, samples per group, pairs, text lengths.

Every pair of a group is a PM comparison and may become a billed judge call, and every character of a prompt or a
response is read by the PM and paid for by the judge: a request over a bound is answered 400 (413 for a body over
its size) naming the bound, and a response longer than its budget is cut to it before the PM and the judge see it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from urllib.parse import parse_qs

from lit_route.checks import check_nonnegative
from lit_route.integrations.groups import keyed_groups
from lit_route.integrations.openrlhf import RequestError, Sample

_DIGITS = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True)
class RequestBounds:
    """Bounds of one request.

    Attributes:
        max_body_bytes: Largest request body read (``Content-Length``); a larger one is answered 413 unread.
        max_group_size: Most samples of one prompt scored together (every pair of a group is compared).
        max_pairs_per_request: Most pairs the groups of one request may make (Σ K·(K−1)/2 over its groups).
        max_prompt_chars: Longest prompt, in characters (a longer one is refused: it cannot be cut and stay one).
        max_response_chars: Longest response the PM and the judge read, in characters; a longer one is cut to its
            first ``max_response_chars`` (``/stats``: ``truncated_responses``).
    """

    max_body_bytes: int = 8 * 1024 * 1024
    max_group_size: int = 64
    max_pairs_per_request: int = 16384
    max_prompt_chars: int = 65536
    max_response_chars: int = 32768

    def __post_init__(self):
        for name in ("max_body_bytes", "max_group_size", "max_pairs_per_request", "max_prompt_chars",
                     "max_response_chars"):
            check_nonnegative(name, getattr(self, name), integer=True, positive=True)
        if self.max_group_size < 2:
            raise ValueError(f"max_group_size: expected an integer >= 2 (samples per prompt); got {self.max_group_size}")

    def content_length(self, headers) -> int:
        """The body's length from the request headers (0 when there is none).

        Raises:
            RequestError: a chunked body, a ``Content-Length`` that is not a number of bytes (``abc``, ``-1``, two
                different values), or one over ``max_body_bytes`` (413).
        """
        if headers.get("transfer-encoding") is not None:
            raise RequestError("transfer-encoding: a chunked body is not read; send it with a content-length")
        values = {v.strip() for v in headers.get_all("content-length") or ()}
        if not values:
            return 0
        if len(values) > 1 or not _DIGITS.fullmatch(next(iter(values))):
            raise RequestError(f"content-length: expected one number of bytes; got {', '.join(sorted(values))[:60]!r}")
        length = int(values.pop())
        if length > self.max_body_bytes:
            raise RequestError(f"body: {length} bytes is over max_body_bytes={self.max_body_bytes}", status=413)
        return length

    def group_size(self, query: str) -> int | None:
        """The group size a request names in its URL's query (``?group_size=4``), or ``None``.

        Raises:
            RequestError: an unknown query parameter, or a group size that is not an integer in
                ``2..max_group_size``.
        """
        if not query:
            return None
        try:
            params = parse_qs(query, keep_blank_values=True, strict_parsing=True, max_num_fields=8)
        except ValueError as err:
            raise RequestError(f"query: not a URL query ({err})") from None
        unknown = sorted(set(params) - {"group_size"})
        if unknown:
            raise RequestError(f"query: unknown parameter {unknown[0][:40]!r} (group_size is the one read)")
        (value, *more) = params["group_size"]
        if more or not _DIGITS.fullmatch(value) or not 2 <= int(value) <= self.max_group_size:
            raise RequestError(f"group_size: expected an integer in 2..{self.max_group_size} (samples per prompt); "
                               f"got {', '.join(params['group_size'])[:40]!r}")
        return int(value)

    def apply(self, samples: Sequence[Sample], group_size: int | None) -> tuple[list[Sample], int]:
        """The samples with each response cut to ``max_response_chars``, and how many were cut.

        Args:
            samples: One request's samples.
            group_size: Samples per group (``None``: the request's samples of a prompt are one group).

        Raises:
            RequestError: a prompt over ``max_prompt_chars``, more than ``max_group_size`` samples of one prompt in
                a request without a group size, or groups making more than ``max_pairs_per_request`` pairs.
        """
        for i, sample in enumerate(samples):
            if len(sample.prompt) > self.max_prompt_chars:
                raise RequestError(f"prompts[{i}]: {len(sample.prompt)} characters, over "
                                   f"max_prompt_chars={self.max_prompt_chars}")
        groups = keyed_groups([s.prompt for s in samples], group_size)
        largest = max((len(g) for g in groups), default=0)
        if largest > self.max_group_size:
            raise RequestError(f"prompts: {largest} samples of one prompt, over max_group_size={self.max_group_size} "
                               f"(samples scored together, every pair compared)")
        pairs = sum(len(g) * (len(g) - 1) // 2 for g in groups)
        if pairs > self.max_pairs_per_request:
            raise RequestError(f"prompts: the request's groups make {pairs} pairs, over "
                               f"max_pairs_per_request={self.max_pairs_per_request}")
        cut = self.max_response_chars
        out = [replace(s, response=s.response[:cut]) if len(s.response) > cut else s for s in samples]
        return out, sum(len(s.response) > cut for s in samples)
