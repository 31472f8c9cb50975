"""The Trainer's FSDP recipe on two gloo CPU processes: bf16 backbone, float32 head, fit + covariance pass."""

import json

import lightning as L
import torch
import torch.multiprocessing as mp
from cpu_fsdp import CPUTrainerFSDP, free_port, process_group_member

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.data.datamodule import PreferenceDataModule
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.models.sharding import TransformerBlockPolicy
from lit_route.preference import PreferenceModule, SNGPConfig
from lit_route.preference.io import load_preference_model


def worker(rank, world, port, data, out):
    with process_group_member(rank, world, port):
        torch.set_num_threads(1)
        L.seed_everything(0)
        module = PreferenceModule(backbone=BackboneSpec(dtype="bfloat16"), lora=LoraSpec(r=4, alpha=8),
                                  sngp=SNGPConfig(num_features=32))
        dm = PreferenceDataModule(train=data, val_fraction=0.0, max_length=96, batch_size=3)
        finalize = FinalizeCovariance(progress=False)
        trainer = L.Trainer(accelerator="cpu", devices=world, precision="bf16-true", max_epochs=1, logger=False,
                            strategy=CPUTrainerFSDP(auto_wrap_policy=TransformerBlockPolicy(), state_dict_type="full"),
                            callbacks=[finalize, L.pytorch.callbacks.ModelCheckpoint(dirpath=out)],
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=out)
        trainer.fit(module, dm)
        with open(f"{out}/rank{rank}.json", "w") as fh:
            json.dump({"ckpt": finalize.ckpt_path, "n": float(module.head.n_accumulated)}, fh)


def test_trainer_fsdp_fits_and_finalises_a_loadable_checkpoint(toy_pairs, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in toy_pairs))
    mp.spawn(worker, args=(2, free_port(), str(data), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["n"] == ranks[1]["n"] == 24  # every pair once over both ranks, in both orders
    raw = torch.load(ranks[0]["ckpt"], weights_only=False)["state_dict"]
    assert any("lora_A" in k for k in raw) and raw["head.covariance"].dtype == torch.float64
    module, _ = load_preference_model(ranks[0]["ckpt"])
    assert module.has_uncertainty and int(module.head.n_accumulated) == 24
