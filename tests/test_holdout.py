"""The PM's held-out split is by prompt: no prompt has pairs on both sides."""

import json

import pytest

from lit_route.data.datamodule import PreferenceDataModule
from lit_route.data.holdout import prompt_key, split_by_prompt


def test_split_keeps_each_prompts_pairs_together_by_hand():
    keys = ["a", "a", "b", "c", "c", "c", "d"]
    train, val = split_by_prompt(keys, 0.5, seed=0)
    assert sorted(train + val) == list(range(7))
    assert not {keys[i] for i in train} & {keys[i] for i in val}
    assert len({keys[i] for i in val}) == 2  # round(0.5 · 4 prompts)


def test_one_pair_per_prompt_holds_out_what_the_split_by_pair_did():
    import random

    keys = [f"p{i}" for i in range(12)]
    idx = list(range(12))
    random.Random(3).shuffle(idx)
    assert split_by_prompt(keys, 0.25, seed=3) == (sorted(idx[3:]), sorted(idx[:3]))


def test_too_few_prompts_is_one_line_naming_the_option():
    with pytest.raises(ValueError, match=r"^data.val_fraction: 3 pairs over 1 prompt\(s\)"):
        split_by_prompt(["x", "x", "x"], 0.1)


def test_conversation_prompts_are_keyed_by_their_messages():
    a = [{"role": "user", "content": "hi"}]
    assert prompt_key(None, a) == prompt_key(None, [dict(a[0])]) != prompt_key(None, [{"role": "user", "content": "ho"}])
    assert prompt_key("hi", None) == "hi"


def test_datamodule_holds_out_whole_prompts(byte_tokenizer, tmp_path):
    """A file as preference sets come (several pairs per prompt, 1 to 5 here, text and conversation prompts):
    no prompt of the validation pairs is among the training pairs, and every pair is used once."""
    rows = []
    for p in range(40):
        prompt = f"Prompt {p}: explain {p}." if p % 3 else None
        messages = [{"role": "user", "content": f"Chat {p}"}] if prompt is None else None
        for j in range(1 + p % 5):
            row = {"chosen": f"good {p}.{j}", "rejected": f"bad {p}.{j}"}
            row["prompt"] = prompt if prompt is not None else messages
            rows.append(row)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = PreferenceDataModule(train=str(path), val_fraction=0.2, max_length=64, seed=1)
    dm.tokenizer = byte_tokenizer
    dm.setup("fit")

    def keys(dataset):
        table = dataset.pairs
        return [prompt_key(p, m) for p, m in zip(table["prompt"], table["prompt_messages"], strict=True)]

    train, val = keys(dm.train_set), keys(dm.val_set)
    assert len(train) + len(val) == len(rows) == 120
    assert not set(train) & set(val)
    assert len(set(val)) == 8  # 20% of the 40 prompts, with all their pairs
