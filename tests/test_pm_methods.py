"""Every uncertainty method through the user's path: YAML/CLI selection, fit on cached features, covariance
pass, finalised checkpoint, reload, antisymmetric scores."""

import json

import pytest
import torch

from lit_route.data.encoding import PairEncoder
from lit_route.preference import score_pairs
from lit_route.preference.io import load_preference_model
from lit_route.uncertainty import HEADS


def write_pairs(path, pairs):
    with open(path, "w") as fh:
        for p in pairs:
            fh.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "id": p.id}) + "\n")
    return str(path)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_method_selected_in_yaml_fits_on_cached_features_and_scores(head, tiny_model_dir, toy_pairs, tmp_path):
    from lit_route.cli import pm_cli

    data = write_pairs(tmp_path / "pairs.jsonl", toy_pairs)
    config = tmp_path / "pm.yaml"
    config.write_text(f"""
seed_everything: 0
trainer: {{max_epochs: 2, accelerator: cpu, devices: 1, logger: false, enable_progress_bar: false,
          enable_model_summary: false, num_sanity_val_steps: 0, default_root_dir: {tmp_path / 'run'}}}
model:
  backbone: {{model_path: {tiny_model_dir}}}
  head: {head}
  freeze_backbone: true
  feature_cache: {tmp_path / 'cache'}
  sngp: {{num_features: 64}}
  ensemble: {{members: 3, hidden: 16}}
  mc_dropout: {{hidden: 16, passes: 8}}
  optim: {{lr: 1.0e-2}}
data: {{train: [{data}], val_fraction: 0.25, max_length: 128, batch_size: 4}}
finalize: {{progress: false}}
""")
    cli = pm_cli(["fit", "--config", str(config)])
    module = cli.model
    assert module.head_kind == head and module.head.ready
    assert module.feature_cache.stats()["hits"] > 0  # epochs after the first never ran the backbone
    finalize = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FinalizeCovariance")
    loaded, enc = load_preference_model(finalize.ckpt_path)
    assert loaded.head_kind == head and loaded.has_uncertainty == (head != "linear")
    swapped = [type(p)(p.prompt, p.rejected, p.chosen, p.subset, p.id) for p in toy_pairs]
    d, u = score_pairs(loaded, toy_pairs, enc, progress=False)
    d_sw, u_sw = score_pairs(loaded, swapped, enc, progress=False)
    # the two orders of a pair sit in different batch rows: float32 noise of ~1e-6 only
    assert torch.allclose(d, -d_sw, atol=1e-4) and torch.allclose(u, u_sw, atol=1e-4)
    assert torch.all(u >= loaded.head.uncertainty_floor)
    # the reloaded checkpoint scores as the trained module did (same features, same head state)
    d0, u0 = score_pairs(module, toy_pairs, PairEncoder(module.tokenizer, max_length=128), progress=False)
    assert torch.allclose(d, d0, atol=1e-5) and torch.allclose(u, u0, atol=1e-5)


def test_length_scale_heuristic_ignores_twins_with_one_pair_per_batch(tiny_model_dir, toy_pairs, tmp_path):
    import lightning as L

    from lit_route.data.datamodule import PreferenceDataModule
    from lit_route.models.backbone import BackboneSpec
    from lit_route.preference.module import PreferenceModule, SNGPConfig
    from lit_route.uncertainty.sngp import median_pair_distance

    L.seed_everything(0)
    module = PreferenceModule(backbone=BackboneSpec(model_path=str(tiny_model_dir)), freeze_backbone=True,
                              sngp=SNGPConfig(num_features=32))
    dm = PreferenceDataModule(train=write_pairs(tmp_path / "p.jsonl", toy_pairs), val_fraction=0.0,
                              max_length=128, batch_size=1)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(module, dm)
    # expected: the median distance between the projected features of different pairs (the projection has
    # moved by one optimiser step since the heuristic ran: recompute with the initial weights)
    fresh = PreferenceModule(backbone=BackboneSpec(model_path=str(tiny_model_dir)), freeze_backbone=True,
                             sngp=SNGPConfig(num_features=32))
    from lit_route.data.encoding import pad_batch

    enc = PairEncoder(fresh.tokenizer, max_length=128)
    seqs = [enc.encode_both(p) for p in toy_pairs]
    batch = pad_batch([a.input_ids for a, _ in seqs] + [b.input_ids for _, b in seqs], fresh.tokenizer.pad_token_id)
    with torch.no_grad():
        z = fresh.head.project(fresh.pooled(batch["input_ids"], batch["attention_mask"]))
    expected = median_pair_distance(z, twin_offset=len(toy_pairs))
    twin_only = (z[0] - z[len(toy_pairs)]).norm()  # what a one-pair batch used to give
    assert float(module.head.features.length_scale) == pytest.approx(float(expected), rel=1e-3)
    assert float(expected) > 2 * float(twin_only)
