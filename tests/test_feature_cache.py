"""The pooled-feature cache: right features, backbone skipped on hits, keys that change with model and encoding."""

import json

import pytest
import torch

from lit_route.data.encoding import PairEncoder, pad_batch
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.preference.features import FeatureCache, sequence_keys
from lit_route.preference.module import PreferenceModule


def frozen_module(model_dir, cache, lora=None):
    return PreferenceModule(backbone=BackboneSpec(model_path=str(model_dir)), head="linear",
                            freeze_backbone=lora is None, lora=lora, feature_cache=str(cache))


def batch_of(module, pairs, max_length=256):
    enc = PairEncoder(module.tokenizer, max_length=max_length)
    seqs = [enc.encode_both(p) for p in pairs]
    return pad_batch([a.input_ids for a, _ in seqs] + [b.input_ids for _, b in seqs], module.tokenizer.pad_token_id)


def count_backbone_calls(module):
    calls = []
    module.backbone.register_forward_hook(lambda *args: calls.append(1))
    return calls


def test_cached_features_equal_the_backbone_and_skip_it(tiny_model_dir, toy_pairs, tmp_path):
    module = frozen_module(tiny_model_dir, tmp_path / "cache")
    batch = batch_of(module, toy_pairs[:5])
    reference = module._backbone_pooled(batch["input_ids"], batch["attention_mask"])
    calls = count_backbone_calls(module)
    first = module.pooled(batch["input_ids"], batch["attention_mask"])
    # misses run on the missing rows trimmed to their own width: float32 rounding of other matmul shapes only
    assert torch.allclose(first, reference, atol=1e-5)
    assert len(calls) == 1
    second = module.pooled(batch["input_ids"], batch["attention_mask"])
    assert len(calls) == 1 and torch.equal(first, second)
    assert module.feature_cache.stats() == {"cached": 10, "hits": 10, "misses": 10}
    # a subset in another batch layout is served from the cache, row by row
    sub = batch_of(module, toy_pairs[2:4])
    assert torch.equal(module.pooled(sub["input_ids"], sub["attention_mask"])[0], first[2])
    module.flush_feature_cache()
    # a new process (a new module on the same folder) reads the shards and never runs the backbone
    again = frozen_module(tiny_model_dir, tmp_path / "cache")
    calls2 = count_backbone_calls(again)
    assert torch.equal(again.pooled(batch["input_ids"], batch["attention_mask"]), first)
    assert not calls2


def test_keys_change_with_encoding_and_with_the_weights(tiny_model_dir, toy_pairs, tmp_path):
    module = frozen_module(tiny_model_dir, tmp_path / "cache")
    long = batch_of(module, toy_pairs[:3], max_length=256)
    short = batch_of(module, toy_pairs[:3], max_length=40)  # truncated: other token ids, other keys
    assert not set(sequence_keys(long["input_ids"], long["attention_mask"])) & set(
        sequence_keys(short["input_ids"], short["attention_mask"]))
    module.pooled(long["input_ids"], long["attention_mask"])
    module.flush_feature_cache()
    changed = frozen_module(tiny_model_dir, tmp_path / "cache")
    with torch.no_grad():
        changed.backbone.norm.weight.add_(0.5)  # other weights: the cache must not serve the old features
    calls = count_backbone_calls(changed)
    changed.pooled(long["input_ids"], long["attention_mask"])
    assert calls and changed.feature_cache.model_key != module.feature_cache.model_key
    meta = json.loads((module.feature_cache.folder / "model.json").read_text())
    assert meta["model_path"] == str(tiny_model_dir)


def test_trainable_bottom_layer_bypasses_the_cache(tiny_model_dir, toy_pairs, tmp_path):
    # LoRA on every layer: no frozen part below the trainable one, nothing to cache
    module = frozen_module(tiny_model_dir, tmp_path / "cache", lora=LoraSpec(r=2, alpha=4))
    batch = batch_of(module, toy_pairs[:2])
    calls = count_backbone_calls(module)
    module.pooled(batch["input_ids"], batch["attention_mask"])
    module.pooled(batch["input_ids"], batch["attention_mask"])
    assert len(calls) == 2 and module.feature_cache.stats()["misses"] == 0


def test_a_shard_cut_short_is_skipped(tmp_path, caplog):
    cache = FeatureCache(tmp_path)
    cache.bind("model")
    ids, mask = torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long)
    cache.get_or_compute(ids, mask, lambda i, m: torch.ones(1, 4))
    cache.flush()
    (cache.folder / "shard-zz.pt").write_bytes(b"PK\x03\x04 cut")  # a kill during a write outside the rename
    fresh = FeatureCache(tmp_path)
    fresh.bind("model")
    assert len(fresh) == 1 and "unreadable shard" in caplog.text
    with pytest.raises(RuntimeError, match="not bound"):
        _ = FeatureCache(tmp_path).folder


def test_lora_top_layers_read_cached_layer_inputs_and_match_the_full_forward(tiny_model_dir, toy_pairs, tmp_path):
    from lit_route.models.split import trainable_start_layer

    module = frozen_module(tiny_model_dir, tmp_path / "cache", lora=LoraSpec(r=2, alpha=4, top_layers=1))
    with torch.no_grad():  # adapters start at zero (B = 0); move them so the top layer's output depends on them
        for name, p in module.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    n_layers = module.backbone.config.num_hidden_layers
    assert trainable_start_layer(module.backbone) == n_layers - 1
    batch = batch_of(module, toy_pairs[:4])
    reference = module._backbone_pooled(batch["input_ids"], batch["attention_mask"])
    cached = module.pooled(batch["input_ids"], batch["attention_mask"])
    again = module.pooled(batch["input_ids"], batch["attention_mask"])
    # the same layers on the same inputs; float32 rounding of other matmul shapes only
    assert torch.allclose(cached, reference, atol=1e-5) and torch.allclose(again, reference, atol=1e-5)
    assert module.feature_cache.stats()["hits"] == 8
    # gradients reach the adapters through the cached inputs
    again.sum().backward()
    grads = [p.grad for n, p in module.backbone.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert "layer" in (module.feature_cache.folder / "model.json").read_text()


def test_a_cut_backbone_pools_its_middle_layer_under_its_own_cache_key(tiny_model_dir, toy_pairs, tmp_path):
    whole = frozen_module(tiny_model_dir, tmp_path / "cache")
    n_layers = whole.backbone.config.num_hidden_layers
    cut = PreferenceModule(backbone=BackboneSpec(model_path=str(tiny_model_dir), num_layers=1), head="linear",
                           freeze_backbone=True, feature_cache=str(tmp_path / "cache"))
    assert n_layers > 1 and len(cut.backbone.layers) == cut.backbone.config.num_hidden_layers == 1
    batch = batch_of(whole, toy_pairs[:3])
    # the whole model's hidden state after layer 1, through the final norm, at the last token
    out = whole.backbone(**batch, output_hidden_states=True, use_cache=False)
    last = batch["attention_mask"].sum(1) - 1
    expected = whole.backbone.norm(out.hidden_states[1])[torch.arange(last.numel()), last]
    got = cut.pooled(batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(got, expected, atol=1e-5)  # float32 rounding of other matmul shapes only
    whole.pooled(batch["input_ids"], batch["attention_mask"])
    assert cut.feature_cache.model_key != whole.feature_cache.model_key  # never served the whole model's features
    assert json.loads((cut.feature_cache.folder / "model.json").read_text())["num_layers"] == 1
    with pytest.raises(ValueError, match=f"num_layers: expected 1..{n_layers}, got {n_layers + 1}"):
        PreferenceModule(backbone=BackboneSpec(model_path=str(tiny_model_dir), num_layers=n_layers + 1), head="linear")


def test_mean_pooling_averages_the_real_tokens_and_keys_its_own_cache(tiny_model_dir, toy_pairs, tmp_path):
    from lit_route.data.encoding import PairEncoder
    from lit_route.policy.pm_scoring import score_groups

    last = frozen_module(tiny_model_dir, tmp_path / "cache")
    mean = PreferenceModule(backbone=BackboneSpec(model_path=str(tiny_model_dir)), head="linear", freeze_backbone=True,
                            feature_cache=str(tmp_path / "cache"), pooling="mean")
    mean.head.load_state_dict(last.head.state_dict())
    batch = batch_of(mean, toy_pairs[:3])
    hidden = mean.backbone(**batch, use_cache=False).last_hidden_state
    mask = batch["attention_mask"]
    expected = torch.stack([hidden[i, mask[i].bool()].mean(0) for i in range(mask.shape[0])])  # padding left out
    assert torch.allclose(mean.pooled(batch["input_ids"], mask), expected, atol=1e-5)
    last.pooled(batch["input_ids"], mask)
    assert mean.feature_cache.model_key != last.feature_cache.model_key
    # group scoring of a mean-pooling PM runs whole sequences (a shared prefix's hidden states are not kept)
    mean.feature_cache = None
    encoder = PairEncoder(mean.tokenizer, max_length=256)
    s, _ = score_groups(mean, encoder, ["Name a colour."], [["Red.", "Blue, like the sky.", "I like green"]])
    ab, ba = encoder.encode_orders("Name a colour.", "Red.", "I like green")
    pair = pad_batch([ab.input_ids, ba.input_ids], mean.tokenizer.pad_token_id)
    d, _ = mean.score_batch(pair)
    assert float(s[0, 0, 2]) == pytest.approx(float(d[0]), abs=1e-5)  # float32 rounding of other batch shapes
    with pytest.raises(ValueError, match="pooling: expected one of"):
        PreferenceModule(backbone=BackboneSpec(model_path=str(tiny_model_dir)), head="linear", pooling="max")
