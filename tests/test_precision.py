"""Dtypes on the GPU recipes' paths: the head keeps float32 and its device; the shipped bf16 recipes train LoRA
as float32 training would."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lit_route.models.backbone import BackboneSpec, LoraSpec, apply_lora, load_backbone
from lit_route.preference import PreferenceModule, SNGPConfig
from lit_route.uncertainty.heads import LinearHead, SNGPHead

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("head", [SNGPHead(16, num_features=8), LinearHead(16)], ids=["sngp", "linear"])
def test_dtype_cast_keeps_the_head_on_its_device(head):
    # `meta` stands in for an accelerator: a dtype-only cast must not move the head to the CPU
    head = head.to("meta").to(torch.bfloat16)
    assert {t.device.type for t in head.state_dict().values()} == {"meta"}
    assert all(p.dtype == torch.float32 for p in head.parameters())
    head = head.to_empty(device="cpu")  # and back, as FSDP's meta-device initialisation does
    assert {t.device.type for t in head.state_dict().values()} == {"cpu"}
    if isinstance(head, SNGPHead):
        assert head.precision.dtype == torch.float64


def test_bf16_module_keeps_a_float32_head_and_its_optimiser_warns():
    module = PreferenceModule(backbone=BackboneSpec(), lora=LoraSpec(r=2, alpha=4), sngp=SNGPConfig(num_features=8))
    module = module.to(torch.bfloat16)  # what precision: bf16-true does
    assert module.backbone.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for p in module.head.parameters()} == {torch.float32}
    assert module.head.covariance.dtype == torch.float64
    with pytest.warns(UserWarning, match="bf16-mixed"):  # the LoRA adapters are bf16 now
        module.configure_optimizers(total_steps=1)


def adapter_movement(precision: str, dtype: str, lr: float, steps: int = 20) -> dict[str, float]:
    """‖Δθ‖ of each LoRA tensor after ``steps`` AdamW steps on a fixed LM loss, under Fabric's ``precision``."""
    L.seed_everything(0)
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    model = apply_lora(load_backbone(BackboneSpec(dtype=dtype), causal_lm=True), LoraSpec(r=4, alpha=8))
    model = fabric.setup_module(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().float().clone() for n, p in params.items()}
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(params.values(), lr=lr))
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    return {n: float((p.detach().float() - start[n]).norm()) for n, p in params.items()}


@pytest.mark.parametrize("config", ["pm/llama8b_sngp_lora.yaml", "rloo/llama8b_anthropic.yaml"])
def test_shipped_bf16_recipes_move_adapters_as_float32_does(config):
    cfg = yaml.safe_load((CONFIGS / config).read_text())
    precision = cfg["trainer"]["precision"]
    spec = cfg["model"].get("backbone") or cfg["model"]["policy"]
    lr = cfg["model"]["optim"]["lr"] if "optim" in cfg["model"] else cfg["model"]["lr"]
    reference = adapter_movement("32-true", "float32", lr)
    recipe = adapter_movement(precision, spec["dtype"], lr)
    ratios = [recipe[n] / reference[n] for n in reference if reference[n] > 0]
    assert len(ratios) == len(reference)
    # AdamW steps are ~lr per element whatever the gradient's scale, so bf16 compute changes them little; a bf16
    # weight rounds a 1e-6 step away entirely (ratio ~0). Half to twice the float32 movement is "as in fp32".
    assert min(ratios) > 0.5 and max(ratios) < 2.0, (precision, min(ratios), max(ratios))
