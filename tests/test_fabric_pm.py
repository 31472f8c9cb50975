"""The preference model on the Fabric engine: the CLI on 1 and 2 gloo processes, FSDP in bf16, configs, resume."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
import yaml
from cpu_fsdp import CPUFabricFSDP, free_port, torchrun_env
from torch.distributed.fsdp import FullyShardedDataParallel

from lit_route.data.datamodule import PreferenceDataModule
from lit_route.fabric import LoopSettings, MetricsRecorder, fit_preference_model
from lit_route.fabric.cli import build_parser
from lit_route.fabric.settings import fabric_strategy
from lit_route.models.backbone import BackboneSpec, LoraSpec
from lit_route.models.sharding import TransformerBlockPolicy
from lit_route.preference import PreferenceModule, SNGPConfig, score_pairs
from lit_route.preference.io import load_preference_model
from lit_route.preference.module import OptimConfig

ROOT = Path(__file__).resolve().parents[1]
# every model config, and every strategy config on top of a model config
CONFIGS = [[str(p)] for p in sorted((ROOT / "configs").glob("[pr]*/*.yaml"))] + [
    ["configs/pm/debug_tiny.yaml", str(p)] for p in sorted((ROOT / "configs" / "trainer").glob("*.yaml"))]


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    return path


def pm_config(tmp_path, data, batch_size, root):
    """A PM config as a user writes it: full-batch steps, so 1 and 2 processes see the same global batches."""
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 2, "log_every_n_steps": 1,
                    "default_root_dir": str(root), "enable_model_summary": False},
        "model": {"backbone": {"model_path": "builtin:tiny-llama"}, "lora": {"r": 4, "alpha": 8},
                  "sngp": {"num_features": 32, "length_scale": 2.0}, "optim": {"lr": 1e-2}},
        # a fixed length-scale: the median heuristic of a first batch depends on how the batch is split
        "data": {"train": [str(data)], "val_fraction": 0.0, "max_length": 96, "batch_size": batch_size},
        "finalize": {"progress": False},
    }
    path = tmp_path / f"pm_{batch_size}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_processes_train_and_finalise_as_one_does(toy_pairs, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", toy_pairs)  # 12 pairs: one full batch per process-step
    one = run_cli([sys.executable, "-m", "lit_route", "fabric", "pm", "--config",
                   str(pm_config(tmp_path, data, 12, tmp_path / "one"))])
    # the README's multi-node recipe on one node: torchrun starts the processes, Fabric joins them
    two = run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lit_route",
                   "fabric", "pm", "--config", str(pm_config(tmp_path, data, 6, tmp_path / "two")),
                   "--trainer.devices", "2", "--trainer.strategy", "ddp"])
    assert (one["world_size"], two["world_size"]) == (1, 2) and one["global_step"] == two["global_step"] == 2
    a = torch.load(one["finalized_ckpt"], weights_only=False)["state_dict"]
    b = torch.load(two["finalized_ckpt"], weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and not any("embed_tokens" in k for k in a)
    assert float(a["head.n_accumulated"]) == float(b["head.n_accumulated"]) == 24
    # Two float32 gradient halves averaged across ranks round differently from one full-batch gradient (and
    # AVX2/AVX-512 kernels differ); two AdamW steps keep that at ~1e-6 relative. The precision sums float64
    # outer products of features computed from those weights: equal to 1e-4 relative on any x86-64 CPU.
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert not torch.equal(a["head.beta.weight"], torch.zeros_like(a["head.beta.weight"]))


def fsdp_worker(rank, world, port, data, out):
    torchrun_env(rank, world, port)
    torch.set_num_threads(1)
    strategy = CPUFabricFSDP(auto_wrap_policy=TransformerBlockPolicy(), state_dict_type="full")
    fabric = L.Fabric(accelerator="cpu", devices=world, strategy=strategy, precision="bf16-true",
                      loggers=[MetricsRecorder()])
    fabric.launch()
    L.seed_everything(0)
    module = PreferenceModule(backbone=BackboneSpec(dtype="bfloat16"), lora=LoraSpec(r=4, alpha=8),
                              sngp=SNGPConfig(num_features=32))
    dm = PreferenceDataModule(train=data, val_fraction=0.25, max_length=96, batch_size=3)
    summary = fit_preference_model(fabric, module, dm, LoopSettings(max_epochs=2, default_root_dir=out))
    head = module.head
    with open(f"{out}/rank{rank}.json", "w") as fh:
        json.dump({"summary": summary, "head_dtypes": sorted({str(p.dtype) for p in head.parameters()}),
                   "precision_dtype": str(head.precision.dtype), "finalized": bool(head.finalized),
                   "units": sorted(type(m.module).__name__ for m in module.modules()
                                   if isinstance(m, FullyShardedDataParallel))}, fh)


def test_fsdp_bf16_with_the_float32_head_trains_and_finalises(toy_pairs, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", toy_pairs)
    mp.spawn(fsdp_worker, args=(2, free_port(), str(data), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in ranks:
        assert r["head_dtypes"] == ["torch.float32"] and r["precision_dtype"] == "torch.float64" and r["finalized"]
        assert r["units"] == ["LlamaDecoderLayer", "LlamaDecoderLayer", "SNGPHead"]
    summary = ranks[0]["summary"]
    # 9 training pairs: 5 per rank (the sampler pads), 2 batches of 3 per epoch, 2 epochs
    assert summary["global_step"] == 4 and set(summary["val"]) >= {"val/accuracy", "val/auroc_uncertainty"}
    module, encoder = load_preference_model(summary["finalized_ckpt"])
    assert module.has_uncertainty and int(module.head.n_accumulated) == 18  # 9 training pairs, both orders
    raw = torch.load(summary["finalized_ckpt"], weights_only=False)["state_dict"]
    assert raw["backbone.base_model.model.layers.0.self_attn.q_proj.lora_A.default.weight"].shape == (4, 32)
    assert any(raw[k].abs().sum() > 0 for k in raw if "lora_B" in k)  # the adapters trained
    d, u = score_pairs(module, toy_pairs, encoder, batch_size=4, progress=False)
    assert torch.isfinite(d).all() and (u >= 1).all()


@pytest.mark.parametrize("paths", CONFIGS, ids=lambda ps: "+".join(Path(p).stem for p in ps))
def test_every_config_parses_for_the_fabric_engine(paths):
    parser = build_parser(Path(paths[0]).parent.name)
    cfg = parser.parse_args([arg for p in paths for arg in ("--config", str(ROOT / p))])
    strategy = fabric_strategy(cfg.trainer.strategy if isinstance(cfg.trainer.strategy, str)
                               else cfg.trainer.strategy.as_dict())
    if not isinstance(strategy, str):
        assert type(strategy).__module__.startswith("lightning.fabric.strategies")
        assert isinstance(strategy._fsdp_kwargs["auto_wrap_policy"], TransformerBlockPolicy)


def test_unsupported_trainer_option_is_one_line_naming_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "lit_route", "fabric", "pm", "--config", "configs/pm/debug_tiny.yaml",
                          "--trainer.val_check_interval", "5"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 2 and "trainer.val_check_interval: not supported by the Fabric engine" in out.stderr
    assert "Traceback" not in out.stderr


def test_fabric_loop_trains_as_the_trainer_does(toy_pairs, tmp_path):
    from lit_route.callbacks.finalize import FinalizeCovariance

    data = str(write_pairs(tmp_path / "pairs.jsonl", toy_pairs))

    def build():
        L.seed_everything(0)
        module = PreferenceModule(backbone=BackboneSpec(), lora=LoraSpec(r=4, alpha=8),
                                  sngp=SNGPConfig(num_features=32), optim=OptimConfig(lr=1e-2, warmup_steps=2))
        return module, PreferenceDataModule(train=data, val_fraction=0.25, max_length=96, batch_size=2)

    module, dm = build()
    trainer = L.Trainer(max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=1.0, accelerator="cpu",
                        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[FinalizeCovariance(progress=False), L.pytorch.callbacks.ModelCheckpoint(tmp_path)],
                        default_root_dir=tmp_path)
    trainer.fit(module, dm)
    fabric_module, fabric_dm = build()
    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[MetricsRecorder()])
    loop = LoopSettings(max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=1.0,
                        default_root_dir=str(tmp_path / "fabric"))
    summary = fit_preference_model(fabric, fabric_module, fabric_dm, loop, FinalizeCovariance(progress=False))
    # 9 training pairs: 5 batches of 2 per epoch, accumulated 2 at a time (the last alone): 3 steps per epoch
    assert summary["global_step"] == trainer.global_step == 6
    a, b = module.state_dict(), fabric_module.state_dict()
    # one process, the same batches, optimiser and schedule: equal up to float32 kernel rounding
    for key in a:
        if a[key].is_floating_point():
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
