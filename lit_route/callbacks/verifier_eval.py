"""``VerifierEval``: held-out accuracy of the greedy policy, checked by a program, during RLOO training."""

from __future__ import annotations

import logging

import lightning as L
import torch

from lit_route.data.io import DataFormatError, iter_records, resolve_path
from lit_route.judges.function import import_callable

log = logging.getLogger(__name__)


def read_task_prompts(path: str, limit: int | None = None) -> list[dict]:
    """Prompt records ``{"prompt": str, ...}`` (JSON lines or array) with their other fields, e.g. ``family``."""
    resolved = resolve_path(path)
    records = []
    for line, record in iter_records(resolved):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise DataFormatError(resolved, line, "expected a non-empty string", "prompt")
        records.append(record)
    if not records:
        raise DataFormatError(resolved, None, "no prompts in this file")
    return records[:limit] if limit else records


class VerifierEval(L.Callback):
    """Greedy completions of held-out prompts, scored by a verifier, before the first step and every N steps.

    Each evaluation appends ``{"step", "accuracy", "by_group": {group: accuracy}}`` to ``history`` and logs
    ``eval/accuracy``; ``history`` is saved in checkpoints. The policy is the module's ``policy`` with its
    adapters, in eval mode, decoding with the module's tokenizer and chat template.

    Args:
        prompts: Held-out prompt records (JSON lines with ``prompt``; ``bundled:`` paths work).
        verifier: Import path of ``(prompt, response) -> bool`` (or a score in [0, 1]).
        every_n_steps: Evaluate after every N optimiser steps (and once before training).
        max_new_tokens: Greedy completion length (default: the module's ``generation.max_new_tokens``).
        batch_size: Prompts per ``generate`` call.
        group_key: Record field to break the accuracy down by (absent: one group ``all``).
        limit: Use the first N prompts only.
    """

    def __init__(
        self,
        prompts: str,
        verifier: str = "lit_route.tasks.verify:passes",
        every_n_steps: int = 5,
        max_new_tokens: int | None = None,
        batch_size: int = 32,
        group_key: str = "family",
        limit: int | None = None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps: expected >= 1, got {every_n_steps}")
        self.records = read_task_prompts(prompts, limit)
        self.verifier = import_callable(verifier, "verifier")
        self.every_n_steps, self.max_new_tokens, self.batch_size = every_n_steps, max_new_tokens, batch_size
        self.group_key = group_key
        self.history: list[dict] = []
        self.last_completions: list[str] = []

    @torch.no_grad()
    def evaluate(self, module) -> dict:
        """Greedy-decodes every prompt with ``module.policy`` and scores the completions."""
        tokenizer, policy = module.tokenizer, module.policy
        max_new = self.max_new_tokens or module.generation.max_new_tokens
        was_training = policy.training
        policy.eval()
        completions: list[str] = []
        for start in range(0, len(self.records), self.batch_size):
            chunk = self.records[start : start + self.batch_size]
            ids = [_prompt_ids(tokenizer, r["prompt"]) for r in chunk]
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(ids):  # left padding, as in training
                input_ids[i, width - len(x) :] = torch.tensor(x)
                mask[i, width - len(x) :] = 1
            out = policy.generate(input_ids=input_ids.to(module.device), attention_mask=mask.to(module.device),
                                  do_sample=False, max_new_tokens=max_new, eos_token_id=module.eos_ids,
                                  pad_token_id=tokenizer.pad_token_id)
            completions += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        policy.train(was_training)
        scores = [float(self.verifier(r["prompt"], c)) for r, c in zip(self.records, completions, strict=True)]
        groups: dict[str, list[float]] = {}
        for r, s in zip(self.records, scores, strict=True):
            groups.setdefault(str(r.get(self.group_key, "all")), []).append(s)
        self.last_completions = completions
        return {
            "accuracy": sum(scores) / len(scores),
            "by_group": {g: sum(v) / len(v) for g, v in sorted(groups.items())},
        }

    def _record(self, trainer, module) -> None:
        result = {"step": trainer.global_step, **self.evaluate(module)}
        self.history.append(result)
        log.info("step %d: held-out verifier accuracy %.3f", result["step"], result["accuracy"])
        if trainer.logger is not None:
            trainer.logger.log_metrics({"eval/accuracy": result["accuracy"]}, step=trainer.global_step)

    def on_train_start(self, trainer, module) -> None:
        if not any(h["step"] == trainer.global_step for h in self.history):
            self._record(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        done = step >= trainer.max_steps > 0
        if step % self.every_n_steps == 0 or done:
            self._record(trainer, module)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = f"User: {prompt}\n\nAssistant:"
    return tokenizer(text, add_special_tokens=False)["input_ids"]
