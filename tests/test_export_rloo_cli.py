"""The policy of a `lit-route rloo fit` run (the Trainer path, LightningCLI, the shipped tiny config) exports from
its `last.ckpt` with `lit-route export`, as adapters and merged, and loads with transformers/peft alone giving the
module's log-probabilities, after the export folder is moved. (A LightningCLI checkpoint records the options as
dicts, not dataclasses.)"""

import json
import shutil
from pathlib import Path

import torch

from lit_route.cli import main, rloo_cli
from lit_route.policy.sampling import token_logprobs

ROOT = Path(__file__).resolve().parents[1]


def test_trainer_rloo_policy_exports_and_loads_with_transformers_and_peft(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cli = rloo_cli(["fit", "--config", str(ROOT / "configs/rloo/debug_tiny.yaml"), f"--trainer.default_root_dir={tmp_path}",
                    "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
                    "--model.generation.max_new_tokens=2", "--model.lr=0.05"])
    ckpt = tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt"
    assert ckpt.is_file()
    ids = cli.model.tokenizer("Human: what is a lock?\n\nAssistant: a thing that keeps a door shut",
                              return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)

    def logp(model):
        with torch.no_grad():
            return token_logprobs(model.eval(), ids[:, :8], mask[:, :8], ids[:, 8:], mask[:, 8:])

    reference = logp(cli.model.policy)
    main(["export", "--ckpt", str(ckpt), "--output_dir", str(tmp_path / "written")])
    shutil.move(tmp_path / "written", tmp_path / "policy")  # the base written into the export moves with it
    config = json.loads((tmp_path / "policy/lit_route.json").read_text())
    assert config["kind"] == "policy" and config["weights"] == "adapter" and config["base_model"]["in_export"]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "policy" / config["base_model"]["path"],
                                                gguf_file=config["base_model"]["gguf_file"])
    untrained = logp(base)
    adapted = logp(PeftModel.from_pretrained(base, tmp_path / "policy"))
    assert not torch.allclose(untrained, reference, atol=1e-3)  # training moved the policy: the adapters matter
    assert torch.allclose(adapted, reference, atol=1e-5)  # the same weights and arithmetic: float rounding only

    main(["export", "--ckpt", str(ckpt), "--output_dir", str(tmp_path / "merged"), "--merge", "true"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logp(merged), reference, atol=1e-4)  # W + BA in one matrix rounds differently
