"""Finding the RLOO groups in a flat batch of (prompt, completion) samples, and putting rewards back in place.

Trainers hand a reward function one flat list per batch: TRL repeats each prompt ``num_generations`` times in a
row (its ``RepeatSampler``), OpenRLHF sends ``n_samples_per_prompt`` samples of a prompt one after another (or,
since 0.9.1, one request per sample). The pairwise reward needs the group of a sample: the other completions of
the same prompt. These are pure functions on lists: indices in, indices out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence


def prompt_key(prompt) -> str:
    """A hashable key for a prompt: the text itself, or a conversation (a list of messages) as canonical JSON."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False, default=str)


def contiguous_groups(prompts: Sequence, group_size: int | None = None) -> list[list[int]]:
    """Runs of equal consecutive prompts, each cut into groups of ``group_size``.

    The same prompt drawn twice in a row makes one run of ``2·group_size``; it becomes two groups, as the trainer
    sees them. A batch in which every prompt has a single completion (evaluation with one generation per prompt)
    is a batch of groups of one. ``prompts`` of length N -> groups of indices in order, covering ``range(N)`` once.

    Args:
        prompts: N prompts (text or chat messages), in the trainer's order.
        group_size: Completions per prompt (TRL's ``num_generations``); ``None``: each run is one group.

    Raises:
        ValueError: when, with ``group_size``, a run's length is not a multiple of it (a lone completion among
            whole groups included): the trainer split a group (across processes, or a per-device batch not
            divisible by the group size), and no pairwise reward exists for a group whose members are elsewhere.
    """
    keys = [prompt_key(p) for p in prompts]
    runs: list[list[int]] = []
    start = 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            runs.append(list(range(start, i)))
            start = i
    if group_size is None or all(len(run) == 1 for run in runs):  # one completion per prompt: an evaluation batch
        return runs
    groups: list[list[int]] = []
    for run in runs:
        if len(run) % group_size:
            what = (f"sample {run[0]} is the only completion of its prompt" if len(run) == 1 else
                    f"samples {run[0]}..{run[-1]} share a prompt but are {len(run)}, not a multiple of {group_size}")
            raise ValueError(
                f"num_generations: {what}: a group of {group_size} was split across batches or processes; make the "
                f"per-process batch (per_device_train_batch_size x steps_per_generation) a multiple of num_generations")
        groups.extend(run[k : k + group_size] for k in range(0, len(run), group_size))
    return groups


def keyed_groups(prompts: Sequence, group_size: int | None = None) -> list[list[int]]:
    """Samples grouped by equal prompt wherever they sit, in order of first appearance, each cut into groups of
    at most ``group_size`` (the rest is a smaller, last group). N prompts -> groups of indices covering range(N)."""
    by_key: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_key.setdefault(prompt_key(p), []).append(i)
    groups: list[list[int]] = []
    for run in by_key.values():
        step = group_size or len(run)
        groups.extend(run[k : k + step] for k in range(0, len(run), step))
    return groups


def completion_text(completion) -> str:
    """A completion as text: TRL's conversational completions are lists of messages (the assistant's turns are
    joined); plain completions are returned as they are."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if isinstance(m, dict) and m.get("role") != "user")


def judge_prompt(prompt) -> str:
    """The prompt as a judge reads it: text as is, a one-message conversation as its content, a longer one as
    ``Role: content`` blocks (the routing callback's rendering)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def scatter(groups: Sequence[Sequence[int]], values: Sequence[Sequence[float]], n: int) -> list[float]:
    """Per-group values back into one flat list of length ``n``: ``out[groups[g][k]] = values[g][k]``."""
    out: list[float | None] = [None] * n
    for idx, vals in zip(groups, values, strict=True):
        for i, v in zip(idx, vals, strict=True):
            out[i] = float(v)
    missing = [i for i, v in enumerate(out) if v is None]
    if missing:
        raise ValueError(f"samples {missing[:5]} belong to no group")
    return out  # type: ignore[return-value]
