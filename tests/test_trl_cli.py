"""TRL-format data straight into `pm fit` and `rloo fit`: parquet, saved dataset folders and JSON Lines."""

import json

from lit_route.cli import main


def conversation(i):
    return [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": f"What is {i}+{i}?"}]


def test_trl_preference_and_prompt_sets_train_through_the_cli(tmp_path, tiny_model_dir):
    from datasets import Dataset

    explicit = [{"prompt": conversation(i), "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
                 "rejected": [{"role": "assistant", "content": "Ask someone else."}]} for i in range(8)]
    Dataset.from_list(explicit).to_parquet(str(tmp_path / "explicit.parquet"))
    implicit = [{"chosen": [*conversation(i), {"role": "assistant", "content": f"{2 * i}."}],
                 "rejected": [*conversation(i), {"role": "assistant", "content": "No."}]} for i in range(8, 14)]
    Dataset.from_list(implicit).save_to_disk(str(tmp_path / "implicit"))
    (tmp_path / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in explicit[:2]).replace("It is", "Sure:"))
    root = tmp_path / "pm"
    main(["pm", "fit", "--config", "configs/pm/debug_tiny.yaml", "--trainer.default_root_dir", str(root),
          "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
          "--model.backbone.model_path", str(tiny_model_dir), "--data.val_fraction", "0.2",
          "--data.train", json.dumps([str(tmp_path / "explicit.parquet"), str(tmp_path / "implicit"),
                                      str(tmp_path / "more.jsonl")])])
    ckpt = next(root.rglob("finalized.ckpt"))
    import torch

    state = torch.load(ckpt, weights_only=False)
    head = {k: v for k, v in state["state_dict"].items() if k == "head.n_accumulated"}
    # 16 pairs over 14 prompts (more.jsonl repeats prompts 0 and 1); 20% of the prompts (3: prompts 1, 10 and 9
    # for seed 0) are held out with all their pairs, 4 in all: the covariance pass saw the other 12 in both orders
    assert float(head["head.n_accumulated"]) == 2 * 12

    prompts = tmp_path / "prompts.parquet"
    Dataset.from_list([{"prompt": conversation(i)} for i in range(4)]).to_parquet(str(prompts))
    main(["rloo", "fit", "--config", "configs/rloo/debug_tiny.yaml", "--trainer.default_root_dir", str(tmp_path / "rl"),
          "--trainer.max_steps", "2", "--trainer.enable_progress_bar", "false", "--trainer.logger", "false",
          "--trainer.callbacks", "[]", "--data.prompts", str(prompts), "--data.max_prompt_chars", "null",
          "--data.limit", "null", "--model.pm_ckpt", str(ckpt), "--model.pm_backbone", "null"])
    assert list((tmp_path / "rl").rglob("*.ckpt"))
