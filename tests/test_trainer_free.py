"""Modules and datamodules build their optimisers, schedules and tokenizers without a Trainer."""

import pytest
import torch

from lit_route.data.datamodule import PreferenceDataModule
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule
from lit_route.preference import PreferenceModule, SNGPConfig
from lit_route.preference.module import OptimConfig


def tiny_module(**optim):
    return PreferenceModule(backbone=BackboneSpec(), lora=LoraSpec(r=2, alpha=4), sngp=SNGPConfig(num_features=8), optim=OptimConfig(**optim))


def test_optimizer_and_schedule_without_a_trainer():
    module = tiny_module(lr=1.0, head_lr=2.0, warmup_steps=2, min_lr_ratio=0.1)
    config = module.configure_optimizers(total_steps=10)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs, head_lrs = [], []
    for _ in range(11):
        lrs.append(optimizer.param_groups[1]["lr"])
        head_lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # by hand, peak 1, floor 0.1, warm-up 2 of 10 steps: linear 0, 1/2, 1; then 0.1 + 0.9 · (1 + cos(π·(t−2)/8))/2
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0])
    assert lrs[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert lrs[4] == pytest.approx(0.1 + 0.9 * (1 + 2**-0.5) / 2)  # a quarter of the way: cos(π/4)
    assert lrs[10] == pytest.approx(0.1)
    assert head_lrs == pytest.approx([2.0 * lr for lr in lrs])  # the head's group: its own peak, same schedule


def test_optimizer_needs_the_step_count_only_without_a_trainer():
    with pytest.raises(ValueError, match="total_steps"):
        tiny_module().configure_optimizers()


def test_preference_datamodule_takes_the_tokenizer_from_connect(toy_pairs, tmp_path):
    import json

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in toy_pairs))
    module = tiny_module()
    dm = PreferenceDataModule(train=str(path), val_fraction=0.25, max_length=64, batch_size=4)
    with pytest.raises(ValueError, match="connect"):
        dm.setup("fit")
    dm.connect(module)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert dm.tokenizer is module.tokenizer and batch["input_ids"].shape[0] == 8
    with pytest.raises(ValueError, match="mode"):
        PreferenceDataModule(train=str(path), mode="pointwise").connect(module)


def test_prompt_datamodule_takes_the_tokenizer_from_connect(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first prompt\nsecond prompt\n")
    dm = PromptDataModule(prompts=str(path), batch_size=2)
    with pytest.raises(ValueError, match="connect"):
        dm.setup("fit")
    dm.connect(tiny_module())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["prompt_ids"].shape[0] == 2 and torch.all(batch["prompt_mask"][:, -1] == 1)  # left-padded
