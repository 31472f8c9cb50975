import json

import lightning as L
import pytest
import torch

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.data.datamodule import PreferenceDataModule
from lit_route.data.encoding import PairEncoder, pad_batch
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.preference import PreferenceModule, SNGPConfig, score_pairs
from lit_route.preference.io import load_preference_model


def make_module(model_dir, head="sngp", lora=True):
    return PreferenceModule(
        backbone=BackboneSpec(model_path=str(model_dir)),
        lora=LoraSpec(r=4, alpha=8, top_layers=1) if lora else None,
        head=head,
        sngp=SNGPConfig(num_features=64),
    )


def write_pairs(path, pairs):
    with open(path, "w") as fh:
        for p in pairs:
            fh.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "id": p.id}) + "\n")
    return path


@pytest.fixture
def trained(tiny_model_dir, toy_pairs, tmp_path):
    L.seed_everything(0)
    data_path = write_pairs(tmp_path / "pairs.jsonl", toy_pairs)
    module = make_module(tiny_model_dir)
    dm = PreferenceDataModule(train=str(data_path), val_fraction=0.25, max_length=128, batch_size=4)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", default_root_dir=tmp_path, enable_progress_bar=False,
        logger=False, callbacks=[FinalizeCovariance(progress=False), L.pytorch.callbacks.ModelCheckpoint(tmp_path)],
        enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, dm)
    return module, dm, trainer, tmp_path


def test_fit_finalizes_and_checkpoint_round_trip_gives_identical_scores(trained, toy_pairs):
    module, dm, _, tmp_path = trained
    assert module.has_uncertainty
    assert int(module.head.n_accumulated) == 2 * len(dm.train_set)
    ckpt = tmp_path / "finalized.ckpt"
    assert ckpt.exists()
    enc = PairEncoder(module.tokenizer, max_length=128)
    d1, u1 = score_pairs(module, toy_pairs, enc, batch_size=5, progress=False)
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    # adapters + head + precision, never the frozen base weights
    keys = set(raw["state_dict"])
    assert any("lora_A" in k for k in keys) and "head.covariance" in keys
    assert not any(k.endswith("embed_tokens.weight") for k in keys)
    assert raw["lit_route"]["base_model"]["model_path"] == str(module.backbone_spec.model_path)
    loaded, enc2 = load_preference_model(ckpt)
    assert loaded.has_uncertainty  # no second pass needed
    assert enc2.max_length == 128
    d2, u2 = score_pairs(loaded, toy_pairs, enc2, batch_size=5, progress=False)
    assert torch.equal(d1, d2) and torch.equal(u1, u2)
    assert torch.all(u1 >= 1.0)


def test_scores_are_antisymmetric(trained, toy_pairs):
    module = trained[0]
    enc = PairEncoder(module.tokenizer, max_length=128)
    swapped = [type(p)(p.prompt, p.rejected, p.chosen, p.subset, p.id) for p in toy_pairs]
    d, u = score_pairs(module, toy_pairs, enc, progress=False)
    d_sw, u_sw = score_pairs(module, swapped, enc, progress=False)
    # exact in arithmetic; here the two orders sit in different batch rows, so float noise of ~1e-6 remains
    assert torch.allclose(d, -d_sw, rtol=1e-2, atol=2e-5)
    # the tiny random model's features are nearly identical, so the median-heuristic length-scale is small and
    # amplifies float noise from the two orders sitting in different batch rows
    assert torch.allclose(u, u_sw, rtol=1e-3)


def test_bf16_backbone_keeps_float64_precision_and_finite_uncertainty(trained, toy_pairs):
    module = trained[0]
    module = module.to(torch.bfloat16)
    assert module.head.covariance.dtype == torch.float64
    assert module.head.beta.weight.dtype == torch.float32
    d, u = score_pairs(module, toy_pairs, PairEncoder(module.tokenizer, max_length=128), progress=False)
    assert torch.isfinite(d).all() and torch.isfinite(u).all() and (u >= 1).all()


def test_linear_head_has_unit_uncertainty(tiny_model_dir, toy_pairs):
    module = make_module(tiny_model_dir, head="linear", lora=False)
    _, u = score_pairs(module, toy_pairs[:3], PairEncoder(module.tokenizer, max_length=128), progress=False)
    assert torch.equal(u, torch.ones(3))


def test_training_step_learns_toy_preference(tiny_model_dir, toy_pairs):
    torch.manual_seed(0)
    module = make_module(tiny_model_dir, head="linear", lora=False)
    enc = PairEncoder(module.tokenizer, max_length=128)
    seqs = [enc.encode_both(p) for p in toy_pairs]
    batch = pad_batch([a.input_ids for a, _ in seqs] + [b.input_ids for _, b in seqs], module.tokenizer.pad_token_id)
    labels = torch.cat([torch.ones(len(seqs)), torch.zeros(len(seqs))])
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    from lit_route.preference.losses import bradley_terry_loss

    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = bradley_terry_loss(module(batch["input_ids"], batch["attention_mask"]), labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


def test_bradley_terry_weights():
    from lit_route.preference.losses import bradley_terry_loss

    logits = torch.tensor([0.0, 0.0])
    labels = torch.tensor([1.0, 0.0])
    assert torch.isclose(bradley_terry_loss(logits, labels), torch.log(torch.tensor(2.0)))
    w = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([3.0, 1.0]))
    # weights arrive globally normalised; the loss is their weighted mean, never renormalised per batch
    expected = (3 * torch.nn.functional.softplus(torch.tensor(-2.0)) + torch.log(torch.tensor(2.0))) / 2
    assert torch.isclose(w, expected)


def test_strength_keeps_its_ratio_with_one_pair_per_batch_and_accumulation(byte_tokenizer):
    from lit_route.data.datamodule import EncodedPairs, PairCollator
    from lit_route.preference.losses import bradley_terry_loss
    from lit_route.types import PreferencePair

    pairs = [PreferencePair("q", "good", "bad", strength=1.0), PreferencePair("q", "good", "bad", strength=3.0)]
    data = EncodedPairs(pairs, PairEncoder(byte_tokenizer, max_length=256, template="plain"), use_strength=True)
    collate = PairCollator(byte_tokenizer.pad_token_id)
    # two micro-batches of one pair each, as under accumulate_grad_batches=2; the same logit for both pairs
    logit = torch.zeros(2, requires_grad=True)
    grads = []
    for item in (data[0], data[1]):
        batch = collate([item])
        loss = bradley_terry_loss(logit, batch["labels"], batch["weights"]) / 2  # Lightning's accumulation scaling
        (g,) = torch.autograd.grad(loss, logit)
        grads.append(g.abs().sum().item())
    # per-batch normalisation made every single-pair batch weigh 1 (ratio 1:1)
    assert grads[1] / grads[0] == pytest.approx(3.0)
    # the global normaliser is the mean strength: weights 0.5 and 1.5
    assert [it[2] for it in data.items] == [0.5, 1.5]


def test_pointwise_mode_trains_and_scores(tiny_model_dir, toy_pairs, tmp_path):
    L.seed_everything(0)
    data_path = write_pairs(tmp_path / "pairs.jsonl", toy_pairs)
    module = PreferenceModule(backbone=BackboneSpec(model_path=str(tiny_model_dir)), head="sngp",
                              sngp=SNGPConfig(num_features=64), mode="pointwise")
    dm = PreferenceDataModule(train=str(data_path), val_fraction=0.0, max_length=128, batch_size=4, mode="pointwise")
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        callbacks=[FinalizeCovariance(progress=False)], enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, dm)
    assert module.has_uncertainty and int(module.head.n_accumulated) == 2 * len(toy_pairs)
    enc = PairEncoder(module.tokenizer, max_length=128, mode="pointwise")
    swapped = [type(p)(p.prompt, p.rejected, p.chosen, p.subset, p.id) for p in toy_pairs]
    d, u = score_pairs(module, toy_pairs, enc, progress=False)
    d_sw, u_sw = score_pairs(module, swapped, enc, progress=False)
    assert torch.allclose(d, -d_sw, rtol=1e-2, atol=2e-5) and torch.allclose(u, u_sw, rtol=1e-3)
    mismatched = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                           enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(ValueError, match=r"data\.mode"):
        mismatched.fit(module, PreferenceDataModule(train=str(data_path), mode="pairwise"))


def test_checkpoint_without_the_exact_sigma_loads_and_scores_as_the_trained_module(trained, toy_pairs):
    """Checkpoints written before the spectral layer kept its exact σ lack ``head.projection.sigma``: they load,
    and switching to eval takes σ from the SVD again, so they score as the module that wrote them."""
    module, _, _, tmp_path = trained
    raw = torch.load(tmp_path / "finalized.ckpt", map_location="cpu", weights_only=False)
    assert float(raw["state_dict"].pop("head.projection.sigma")) > 0
    old = tmp_path / "before_sigma.ckpt"
    torch.save(raw, old)
    loaded, enc = load_preference_model(old)
    d, u = score_pairs(loaded, toy_pairs, enc, batch_size=5, progress=False)
    d_ref, u_ref = score_pairs(module, toy_pairs, enc, batch_size=5, progress=False)
    assert torch.equal(d, d_ref) and torch.equal(u, u_ref)
