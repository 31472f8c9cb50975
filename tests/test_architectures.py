"""Any causal-LM architecture transformers loads trains as a PM and a policy, with peft options passed through."""

import lightning as L
import pytest
import torch
from tiny_archs import ARCHS, save_tiny

from lit_route.data.datamodule import PreferenceDataModule
from lit_route.models.backbone import BackboneSpec, LoraSpec, load_backbone
from lit_route.preference import PreferenceModule, SNGPConfig


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory):
    return {arch: save_tiny(tmp_path_factory.mktemp(arch), arch) for arch in ARCHS}


def write_pairs(path, n=8):
    import json

    rows = [{"prompt": [{"role": "user", "content": f"what is {i}+{i}?"}],
             "chosen": [{"role": "assistant", "content": f"It is {2 * i}."}],
             "rejected": [{"role": "assistant", "content": "no idea"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lora_params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad and "lora_" in n}


@pytest.mark.parametrize("arch", ARCHS)
def test_pm_trains_all_linear_on_any_architecture(arch, arch_dirs, tmp_path):
    L.seed_everything(0)
    lora = LoraSpec(r=2, alpha=4, target_modules="all-linear", top_layers=1, rank_pattern={r".*mlp\..*": 3})
    module = PreferenceModule(backbone=BackboneSpec(model_path=str(arch_dirs[arch])), lora=lora,
                              sngp=SNGPConfig(num_features=32))
    adapted = {n.split(".lora_A")[0] for n in lora_params(module) if ".lora_A" in n}
    layer_list = "h" if arch == "gpt2" else "layers"
    assert adapted and all(f".{layer_list}.1." in n for n in adapted)  # top layer only
    # every linear layer of that block, GPT-2's Conv1D ones included
    kinds = {n.rsplit(".", 1)[-1] for n in adapted}
    expected = {"gpt2": {"c_attn", "c_proj", "c_fc"},
                "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
                "gemma": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}[arch]
    assert kinds == expected
    ranks = {n: p.shape[0] for n, p in module.named_parameters() if ".lora_A." in n}
    assert any(r == 3 for n, r in ranks.items() if ".mlp." in n) and all(
        r == 2 for n, r in ranks.items() if ".mlp." not in n)
    before = lora_params(module)
    dm = PreferenceDataModule(train=str(write_pairs(tmp_path / "trl.jsonl")), val_fraction=0.25, max_length=64,
                              batch_size=2)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    after = lora_params(module)
    # LoRA's B starts at zero: after 3 AdamW steps at lr 1e-4 every B has moved by ~1e-4, far above float noise
    moved = [n for n in before if "lora_B" in n and not torch.allclose(before[n], after[n], atol=1e-7)]
    assert len(moved) == sum("lora_B" in n for n in before)


def test_peft_options_reach_lora_config_and_unknown_ones_are_named(arch_dirs):
    base = load_backbone(BackboneSpec(model_path=str(arch_dirs["qwen2"])))
    config = LoraSpec(target_modules="all-linear", peft_options={"use_rslora": True, "exclude_modules": ["o_proj"]},
                      alpha_pattern={"down_proj": 7}).to_peft(base)
    assert config.use_rslora and config.exclude_modules == {"o_proj"} and config.alpha_pattern == {"down_proj": 7}
    with pytest.raises(ValueError, match=r"lora.peft_options: 'use_rank' is not a peft LoraConfig field"):
        LoraSpec(peft_options={"use_rank": True}).to_peft(base)
    from lit_route.models.backbone import apply_lora

    gpt2 = load_backbone(BackboneSpec(model_path=str(arch_dirs["gpt2"])))
    with pytest.raises(ValueError, match=r"lora.target_modules: .* not found in this GPT2Model; its linear layers "
                                         r"are \['c_attn', 'c_fc', 'c_proj'\] \(or use all-linear\)"):
        apply_lora(gpt2, LoraSpec())


def test_quantization_is_refused_clearly_without_a_gpu(arch_dirs):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a CUDA GPU: it checks the refusal of quantization on CPU")
    with pytest.raises(ValueError, match="quantization: bitsandbytes quantisation needs a CUDA GPU"):
        load_backbone(BackboneSpec(model_path=str(arch_dirs["qwen2"]), quantization="4bit"))


def test_policy_trains_all_linear_on_a_non_llama_model(arch_dirs):
    from lit_route.policy.module import RLOOPolicyModule
    from lit_route.policy.sampling import GenerationConfig

    module = RLOOPolicyModule(policy=BackboneSpec(model_path=str(arch_dirs["qwen2"])),
                              lora=LoraSpec(r=2, alpha=4, target_modules="all-linear"), pm_backbone=BackboneSpec(),
                              generation=GenerationConfig(num_samples=2, max_new_tokens=3), lr=1e-2)
    assert any("lora_A" in n for n, p in module.named_parameters() if p.requires_grad)
    assert not any("lm_head" in n and "lora" in n for n, _ in module.named_parameters())  # all-linear skips it
