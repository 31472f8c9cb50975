"""The frozen backbone's one pass in length order: batches by hand, fewer padded tokens than shuffled training
batches on real data, every feature computed before the first epoch, and the same features."""

import lightning as L
import pytest
import torch

from lit_route.data.datamodule import PreferenceDataModule
from lit_route.models.backbone import BackboneSpec
from lit_route.preference.features import fill_feature_cache, length_batches, padded_tokens
from lit_route.preference.module import PreferenceModule


def test_length_batches_by_hand():
    lengths = [5, 1, 3, 3, 2]
    # longest first: 0 (5), 2 (3), 3 (3), 4 (2), 1 (1); two rows per batch
    batches = length_batches(lengths, max_rows=2, max_tokens=100)
    assert batches == [[0, 2], [3, 4], [1]]
    assert padded_tokens(lengths, batches) == 2 * 5 + 2 * 3 + 1 * 1 == 17  # against 14 real tokens
    # the token budget closes a batch: 4 + 4 fits 8, a third row of 4 would make 12
    assert length_batches([4, 4, 4], max_rows=10, max_tokens=8) == [[0, 1], [2]]
    assert length_batches([9, 1], max_rows=10, max_tokens=8) == [[0], [1]]  # longer than the budget: alone


def test_every_sequence_once_and_padding_never_above_shuffled_batches():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 400, (1000,), generator=g).tolist()
    batches = length_batches(lengths, max_rows=64, max_tokens=64 * 400)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    shuffled = [list(range(i, min(i + 64, 1000))) for i in range(0, 1000, 64)]
    assert sum(lengths) <= padded_tokens(lengths, batches) < padded_tokens(lengths, shuffled)


def datamodule(batch_size=8, max_length=256):
    return PreferenceDataModule(train=["bundled:llmbar/Natural.json", "bundled:llmbar/Processed-FairEval.json"],
                                val_fraction=0.15, max_length=max_length, batch_size=batch_size)


def module(cache):
    return PreferenceModule(backbone=BackboneSpec("builtin:tiny-llama"), head="margin", freeze_backbone=True,
                            feature_cache=str(cache))


def test_the_feature_pass_reads_fewer_padded_tokens_than_the_first_epoch(tmp_path):
    pm = module(tmp_path / "cache")
    dm = datamodule(batch_size=32, max_length=1024)  # bytes: few sequences reach 1024, so lengths vary
    dm.connect(pm)
    dm.setup("fit")
    shuffled = 0
    for loader in (dm.train_dataloader(), dm.val_dataloader()):  # what the first epoch and validation read
        for batch in loader:
            shuffled += batch["attention_mask"].shape[0] * int(batch["attention_mask"].sum(1).max())
    sequences = [ids for data in (dm.train_set, dm.val_set) for ab, ba, _ in data.items for ids in (ab, ba)]
    summary = fill_feature_cache(pm, sequences, pm.tokenizer.pad_token_id, progress=False)
    assert summary["computed"] == len(set(map(tuple, sequences)))
    # length order: within 5% of the real tokens, and well under the shuffled batches (exact figures: the report)
    assert summary["tokens"] <= summary["padded_tokens"] <= 1.05 * summary["tokens"]
    assert summary["padded_tokens"] < 0.8 * shuffled
    assert fill_feature_cache(pm, sequences, pm.tokenizer.pad_token_id, progress=False)["computed"] == 0


def test_pm_fit_computes_every_feature_before_the_first_epoch_and_trains_on_the_same_features(tmp_path):
    def fit(cache, warm):
        L.seed_everything(0)
        pm = module(cache)
        if not warm:
            pm.on_fit_start = lambda: None  # the old path: features computed inside the shuffled first epoch
        trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        dm = datamodule()
        trainer.fit(pm, dm)
        return pm

    warm = fit(tmp_path / "warm", True)
    stats = warm.feature_cache.stats()
    assert stats["misses"] == stats["cached"] > 0  # nothing computed after the pass: every later read is a hit
    cold = fit(tmp_path / "cold", False)
    for key, value in cold.head.state_dict().items():
        # the same features up to float32 rounding of other batch shapes, so the same training
        torch.testing.assert_close(warm.head.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("world_size", [2])
def test_the_pass_is_skipped_under_several_processes(tmp_path, world_size):
    pm = module(tmp_path / "cache")

    class Trainer:
        datamodule = datamodule()
        progress_bar_callback = None

    Trainer.world_size = world_size
    pm._trainer = Trainer()
    pm.on_fit_start()
    assert pm.feature_cache.stats()["cached"] == 0


def test_the_feature_pass_bar_shows_a_rate_sequences_done_and_the_time_left(tmp_path, capsys):
    import re

    pm = module(tmp_path / "cache")
    sequences = [[5, 6, 7] * k for k in range(1, 20)]
    fill_feature_cache(pm, sequences, pm.tokenizer.pad_token_id, max_rows=4, progress=True)
    err = capsys.readouterr().err
    # before: Lightning's epoch bar, `0.00it/s` for minutes while each batch ran the backbone
    assert re.search(r"[\d.]+k?(tok/s|s/tok)", err) and "19/19 sequences" in err
    assert re.search(r"<\d\d:\d\d", err)  # the time left


def test_the_fabric_loop_runs_the_same_pass_before_its_first_batch(tmp_path):
    """`lit-route fabric pm` on a frozen backbone: every feature is computed by the length-ordered pass, none in
    the shuffled first epoch (before, the Fabric loop had no pass and every read of epoch 1 was a miss)."""
    from lit_route.callbacks.finalize import FinalizeCovariance
    from lit_route.fabric import LoopSettings, MetricsRecorder, fit_preference_model

    L.seed_everything(0)
    pm = module(tmp_path / "cache")
    dm = datamodule()
    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[MetricsRecorder()])
    loop = LoopSettings(max_epochs=2, default_root_dir=str(tmp_path / "run"), logger=False)
    summary = fit_preference_model(fabric, pm, dm, loop, FinalizeCovariance(progress=False))
    sequences = {tuple(ids) for data in (dm.train_set, dm.val_set) for ab, ba, _ in data.items for ids in (ab, ba)}
    assert summary["feature_pass"]["computed"] == len(sequences)
    stats = pm.feature_cache.stats()
    assert stats["misses"] == stats["cached"] == len(sequences)  # every later read was a hit
