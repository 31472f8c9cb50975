"""Two gloo processes: routing is decided on the gathered global batch, so both ranks agree on the budget."""

import json
import os

import lightning as L
import torch

from lit_route.callbacks import UncertaintyRouting
from lit_route.judges import HFLocalJudge
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.policy.data import PromptDataModule
from lit_route.policy.module import RLOOPolicyModule
from lit_route.policy.sampling import GenerationConfig


class RecordingRouting(UncertaintyRouting):
    """Writes, per rank and step, how many local pairs were routed and the ledger after the step."""

    def __init__(self, out_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.out_dir = out_dir

    def setup(self, trainer, pl_module, stage):
        import uuid

        self._set_run_id(uuid.uuid4().hex)  # as if each rank had built its callback itself (`ddp`, not spawn)

    def on_before_rewards(self, trainer, module, ctx):
        routed = len(self._pending[1]) if self._pending else 0
        super().on_before_rewards(trainer, module, ctx)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.jsonl"), "a") as fh:
            fh.write(json.dumps({"step": trainer.global_step, "local_routed": routed, "ledger": self.ledger.calls,
                                 "seen": self.pairs_seen, "run": self.run_id}) + "\n")


def test_two_rank_routing_agrees_on_the_global_budget(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Prompt number {i}, please answer." for i in range(16)))
    module = RLOOPolicyModule(policy=BackboneSpec(), lora=LoraSpec(r=2, alpha=4), pm_backbone=BackboneSpec(),
                              generation=GenerationConfig(num_samples=3, max_new_tokens=4))
    cb = RecordingRouting(str(tmp_path), judge=HFLocalJudge("builtin:tiny-llama", gguf_file=None, max_prompt_tokens=128), fraction=0.5, max_calls_total=15)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                        callbacks=[cb], default_root_dir=tmp_path)
    torch.set_num_threads(1)
    trainer.fit(module, PromptDataModule(prompts=str(prompts), batch_size=2))
    rows = [[json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows, strict=True):
        assert a["ledger"] == b["ledger"] and a["seen"] == b["seen"]  # identical global accounting on both ranks
        assert a["run"] == b["run"]  # spend recorded in a shared verdict cache under one run id
    # global batch: 2 ranks x 2 prompts x 3 pairs = 12 pairs; half routed = 6 per step (one billed call each),
    # then the cap of 15
    totals = [a["local_routed"] + b["local_routed"] for a, b in zip(*rows, strict=True)]
    assert totals == [6, 6, 3]
    assert rows[0][-1]["ledger"] == 15 and rows[0][-1]["seen"] == 36
