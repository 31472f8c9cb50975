"""``PromptDataModule``: prompts for online RLHF, rendered with the policy's chat template, left-padded."""

from __future__ import annotations

import json
import logging

import lightning as L
import torch
from torch.utils.data import DataLoader

from lit_route.checks import check_optional
from lit_route.data.adapters import RecordError
from lit_route.data.io import SURROGATE_MESSAGE, DataFormatError, lone_surrogate, read_text, resolve_path
from lit_route.data.readers import load_pairs
from lit_route.data.sampler import ResumableLoader, ResumableSampler
from lit_route.data.tables import quiet_datasets, read_table

log = logging.getLogger(__name__)


def first_turn(messages: list[dict]) -> list[dict]:
    """The leading system message(s) and the first user turn: the conversation as it first reached the model."""
    n_system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    return messages[: n_system + 1]


class PromptMapper:
    """``Dataset.map`` function (batched, with indices): prompt-only records -> message lists (or an error).

    Args:
        lines: Line of each row for text files; ``None`` for tables.
    """

    def __init__(self, lines: list[int] | None = None):
        self.lines = lines

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out: dict[str, list] = {"messages": [], "line": [], "row": [], "error": [], "error_field": []}
        for row, value in zip(indices, batch["prompt"], strict=True):
            messages, error, field = None, None, None
            try:
                messages = _prompt_messages(value)
            except RecordError as err:
                error, field = err.message, err.field
            out["messages"].append(messages)
            out["line"].append(self.lines[row] if self.lines is not None else None)
            out["row"].append(row)
            out["error"].append(error)
            out["error_field"].append(field)
        return out


def _prompt_messages(value) -> list[dict]:
    if isinstance(value, str) and value.strip():
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        messages = []
        for i, m in enumerate(value):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise RecordError(f"message {i} must have string 'role' and 'content'", "prompt")
            messages.append({"role": m["role"], "content": m["content"]})
    else:
        raise RecordError("expected a non-empty string or message list", "prompt")
    bad = lone_surrogate(messages)
    if bad:
        raise RecordError(SURROGATE_MESSAGE, "prompt")
    return messages


def _prompt_only(path) -> list[list[dict]] | None:
    """Prompts of a prompt-only dataset (``{"prompt": str | messages}`` without ``chosen``), else ``None``."""
    table, lines, records = read_table(path)
    if table is not None:
        if "prompt" not in table.column_names or "chosen" in table.column_names:
            return None
        with quiet_datasets():
            mapped = table.map(PromptMapper(lines), batched=True, with_indices=True,
                               remove_columns=table.column_names)
        cols = mapped.to_dict()
    else:
        first = next((r for _, r in records if isinstance(r, dict)), None)
        if first is None or "prompt" not in first or "chosen" in first:
            return None
        mapper = PromptMapper([line for line, _ in records])
        cols = mapper({"prompt": [r.get("prompt") if isinstance(r, dict) else r for _, r in records]},
                      list(range(len(records))))
    for line, row, error, field in zip(cols["line"], cols["row"], cols["error"], cols["error_field"], strict=True):
        if error is not None:
            raise DataFormatError(path, line, error, field, row=row if line is None else None)
    return [[{"role": m["role"], "content": m["content"]} for m in messages] for messages in cols["messages"]]


def read_prompts(path: str, first_turn_only: bool = False) -> list[list[dict]]:
    """Prompts as chat message lists, deduplicated, in order.

    Args:
        path: A ``.txt`` file (one prompt per line), a prompt-only dataset (TRL's ``{"prompt": str | messages}``
            as JSON / JSON Lines / parquet / a saved dataset folder), or any preference-pair file (its prompts).
        first_turn_only: Keep the leading system message(s) and the first user turn of each conversation.
    """
    resolved = resolve_path(path)
    if resolved.suffix == ".txt":
        # UTF-8 cannot encode a lone surrogate: read_text rejects one as invalid UTF-8, naming the line
        lines = read_text(resolved).split("\n")
        prompts = [[{"role": "user", "content": line.rstrip("\r")}] for line in lines if line.strip()]
    else:
        prompts = _prompt_only(resolved)
        if prompts is None:
            prompts = [p.prompt_messages() for p in load_pairs(path, skip_invalid=True)]
    if first_turn_only:
        prompts = [first_turn(p) for p in prompts]
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
        first_turn_only: Keep the leading system message(s) and the first user turn of each conversation.
        max_prompt_tokens: Longer prompts lose their beginning (counted and reported).
        max_prompt_chars: Drop prompts longer than this many characters before tokenising (``None``: keep all).
        limit: Use at most this many prompts.
        batch_size: Prompts per step (each gets K samples).
        seed: Shuffling seed.

    The loader is resumable: the datamodule counts the prompts that training steps actually received (in
    :meth:`on_after_batch_transfer`, so a batch prefetched but never trained on is not counted) and keeps the
    count in checkpoints; a run resumed mid-epoch continues with the prompts the interrupted one had not seen.
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
        for name, value in (("batch_size", batch_size), ("max_prompt_tokens", max_prompt_tokens), ("limit", limit)):
            check_optional(f"data.{name}", value, integer=True, positive=True)  # before torch or the tokenizer does
        self.save_hyperparameters()
        self.tokenizer = None
        self.items: list[dict] | None = None
        self.n_truncated = 0
        self.sampler: ResumableSampler | None = None
        self.shard = (1, 0)  # (world size, rank) without a Trainer; see connect()
        self.epoch, self.consumed = 0, 0  # prompts (all ranks) that training steps received in `epoch`

    def connect(self, module, world_size: int = 1, rank: int = 0) -> None:
        """Takes the policy's tokenizer and this process's shard of the prompts (a Trainer's ``setup`` does
        this from the Trainer; call it yourself without one, e.g. with ``fabric.world_size, fabric.global_rank``)."""
        self.tokenizer = module.tokenizer
        self.shard = (world_size, rank)

    def setup(self, stage: str | None = None) -> None:
        if self.items is not None:
            return
        if self.tokenizer is None and self.trainer is not None:
            self.connect(self.trainer.lightning_module)
        if self.tokenizer is None:
            raise ValueError("PromptDataModule: no tokenizer; call connect(module) before setup() without a Trainer")
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
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else self.shard
        self.sampler = ResumableSampler(self.items, num_replicas=world, rank=rank, seed=self.hparams.seed,
                                        skip=self.consumed, skip_epoch=self.epoch,
                                        current_epoch=(lambda: trainer.current_epoch) if trainer is not None else None)
        return ResumableLoader(self.items, batch_size=self.hparams.batch_size, sampler=self.sampler,
                               collate_fn=self.collate, drop_last=True, position=self.state_dict)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self.sampler is not None and (self.trainer is None or self.trainer.training):
            if self.sampler.epoch != self.epoch:  # the first batch of a new epoch
                self.epoch, self.consumed = self.sampler.epoch, 0
            self.consumed += len(batch["messages"]) * self.sampler.num_replicas
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epoch, self.consumed = int(state_dict["epoch"]), int(state_dict["consumed"])
