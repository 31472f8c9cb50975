"""``PromptDataModule``: prompts for online RLHF, rendered with the policy's chat template, left-padded."""

from __future__ import annotations

import json
import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_route.data.io import DataFormatError, iter_records, resolve_path
from lit_route.data.readers import load_pairs

log = logging.getLogger(__name__)


def read_prompts(path: str, first_turn_only: bool = False) -> list[list[dict]]:
    """Prompts as chat message lists from a ``.txt`` file (one per line), a JSONL file with ``prompt`` (text or
    messages), or any preference-pair file (its prompts, deduplicated, in order)."""
    resolved = resolve_path(path)
    if resolved.suffix == ".txt":
        lines = resolved.read_text(encoding="utf-8").splitlines()
        prompts = [[{"role": "user", "content": line}] for line in lines if line.strip()]
    else:
        first = next(iter_records(resolved), (None, None))[1]
        if isinstance(first, dict) and "prompt" in first and "chosen" not in first:
            prompts = []
            for line, record in iter_records(resolved):
                value = record.get("prompt") if isinstance(record, dict) else None
                if isinstance(value, str) and value.strip():
                    prompts.append([{"role": "user", "content": value}])
                elif isinstance(value, list) and value:
                    prompts.append([dict(m) for m in value])
                else:
                    raise DataFormatError(resolved, line, "expected a non-empty string or message list", "prompt")
        else:
            prompts = [p.prompt_messages() for p in load_pairs(path, skip_invalid=True)]
    if first_turn_only:
        prompts = [[p[0]] for p in prompts]
    seen, out = set(), []
    for p in prompts:
        key = json.dumps(p, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(p)
    if not out:
        raise DataFormatError(resolved, None, "no prompts in this file")
    return out


class PromptDataModule(L.LightningDataModule):
    """Prompts for :class:`~lit_route.policy.module.RLOOPolicyModule`.

    Args:
        prompts: Prompt file (``.txt``, JSONL with ``prompt``, or a preference-pair file); ``bundled:`` paths work.
        first_turn_only: Keep only the first message of multi-turn prompts.
        max_prompt_tokens: Longer prompts lose their beginning (counted and reported).
        max_prompt_chars: Drop prompts longer than this many characters before tokenising (``None``: keep all).
        limit: Use at most this many prompts.
        batch_size: Prompts per step (each gets K samples).
        seed: Shuffling seed.
    """

    def __init__(
        self,
        prompts: str = "bundled:hh-rlhf/harmless-base-test.jsonl.gz",
        first_turn_only: bool = True,
        max_prompt_tokens: int = 256,
        max_prompt_chars: int | None = None,
        limit: int | None = None,
        batch_size: int = 2,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = None
        self.items: list[dict] | None = None
        self.n_truncated = 0

    def setup(self, stage: str | None = None) -> None:
        if self.items is not None:
            return
        if self.tokenizer is None:
            self.tokenizer = self.trainer.lightning_module.tokenizer
        hp = self.hparams
        prompts = read_prompts(hp.prompts, hp.first_turn_only)
        if hp.max_prompt_chars is not None:
            prompts = [p for p in prompts if sum(len(m["content"]) for m in p) <= hp.max_prompt_chars]
        prompts = prompts[: hp.limit] if hp.limit else prompts
        self.items = []
        for messages in prompts:
            if getattr(self.tokenizer, "chat_template", None):
                text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            else:
                text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\n\nAssistant:"
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > hp.max_prompt_tokens:
                ids = ids[-hp.max_prompt_tokens :]
                self.n_truncated += 1
            self.items.append({"ids": ids, "messages": messages})
        log.info("%d prompts; %d truncated to %d tokens", len(self.items), self.n_truncated, hp.max_prompt_tokens)

    def collate(self, items: list[dict]) -> dict:
        width = max(len(it["ids"]) for it in items)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):  # left padding: generation continues right after the prompt
            ids[i, width - len(it["ids"]) :] = torch.tensor(it["ids"])
            mask[i, width - len(it["ids"]) :] = 1
        return {"prompt_ids": ids, "prompt_mask": mask, "messages": [it["messages"] for it in items]}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.items, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=self.collate,
                          generator=torch.Generator().manual_seed(self.hparams.seed), drop_last=True)
