"""The PM's training order: one permutation per epoch, seeded by data.seed + epoch, sharded when iterated."""

import json

import torch

from lit_route.data.datamodule import EpochShuffle, PreferenceDataModule


def order(loader, epoch):
    loader.sampler.set_epoch(epoch)  # what the Trainer and Fabric's loader do at every epoch start
    return [i for i in loader.sampler]


def test_each_epoch_order_depends_on_seed_and_epoch_only(byte_tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(10)))

    def loader():
        dm = PreferenceDataModule(train=str(path), val_fraction=0, max_length=96, batch_size=2, seed=7)
        dm.tokenizer = byte_tokenizer
        dm.setup("fit")
        return dm.train_dataloader()

    a, b = loader(), loader()
    list(a), list(a)  # iterating a loader (twice) draws nothing that a later epoch depends on
    assert order(a, 2) == order(b, 2) == torch.randperm(10, generator=torch.Generator().manual_seed(9)).tolist()
    assert order(a, 0) != order(a, 1)


def test_shards_are_read_when_iterated():
    """A loader built before the processes exist (world 1) is sharded once they do: two ranks take the even and
    odd positions of the same permutation, the shorter shard padded from its start."""
    world = [(0, 1)]
    sampler = EpochShuffle(range(5), seed=0, world=lambda: world[0])
    full = list(sampler)
    assert len(sampler) == 5 and sorted(full) == list(range(5))
    world[0] = (0, 2)
    rank0 = list(sampler)
    world[0] = (1, 2)
    rank1 = list(sampler)
    assert len(sampler) == 3
    assert rank0 == full[0::2] and rank1 == full[1::2] + full[:1]
