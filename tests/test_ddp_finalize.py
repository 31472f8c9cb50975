"""Two gloo processes must finalise the precision that one process does on the same data: the same pairs, each
counted once, summed across ranks (equal up to float32 rounding of the features)."""

import json
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.data.datamodule import PreferenceDataModule
from lit_route.models.backbone import BackboneSpec
from lit_route.preference import PreferenceModule, SNGPConfig


def build(model_dir, data_path):
    torch.manual_seed(0)
    module = PreferenceModule(backbone=BackboneSpec(model_path=model_dir), sngp=SNGPConfig(num_features=48))
    dm = PreferenceDataModule(train=data_path, val_fraction=0.0, max_length=96, batch_size=2)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    return module, dm


def _worker(rank, world, port, model_dir, data_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module, dm = build(model_dir, data_path)
        FinalizeCovariance.run(module, dm.finalize_dataloader(rank, world))
        torch.save({"precision": module.head.precision, "n": module.head.n_accumulated}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_finalize_equals_single_process(tiny_model_dir, toy_pairs, tmp_path):
    data_path = tmp_path / "pairs.jsonl"
    data_path.write_text("".join(
        json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in toy_pairs[:11]
    ))  # an odd count: a padding sampler would count one pair twice
    mp.spawn(_worker, args=(2, _free_port(), str(tiny_model_dir), str(data_path), str(tmp_path)), nprocs=2)
    module, dm = build(str(tiny_model_dir), str(data_path))
    FinalizeCovariance.run(module, dm.finalize_dataloader(0, 1))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(ranks[0]["precision"], ranks[1]["precision"])  # every rank holds the same sum
    assert int(ranks[0]["n"]) == int(module.head.n_accumulated) == 22
    # The float64 sum is over float32 features, which differ in their last bits between the runs: a rank pads its
    # shard's batches to other widths, and matmul kernels (AVX2 vs AVX-512, thread count) sum in other orders.
    # float32 rounding is ~6e-8 relative per feature; 1e-5 leaves room for the reductions of the forward pass.
    scale = module.head.precision.abs().max()
    assert torch.allclose(ranks[0]["precision"], module.head.precision, rtol=1e-5, atol=1e-5 * float(scale))
