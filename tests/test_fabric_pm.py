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
from cpu_fsdp import CPUFabricFSDP, free_port, process_group_member
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
from lit_route.uncertainty.registry import HEADS

ROOT = Path(__file__).resolve().parents[1]
GP_STATE = ("head.precision", "head.covariance")
# every model config, and every strategy config on top of a model config
CONFIGS = [[str(p)] for p in sorted((ROOT / "configs").glob("[pr]*/*.yaml"))] + [
    ["configs/pm/debug_tiny.yaml", str(p)] for p in sorted((ROOT / "configs" / "trainer").glob("*.yaml"))]


def write_pairs(path, pairs):
    path.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in pairs))
    return path


def run_cli(args, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_both_engines_on_one_and_two_processes_finalise_the_same_model(toy_pairs, tmp_path):
    """The README's commands on the shipped debug config: `lit-route fabric pm` on one process, the same under
    torchrun on two, and `lit-route pm fit` (the Trainer) with the 2-process strategy config."""
    data = write_pairs(tmp_path / "pairs.jsonl", toy_pairs)

    def overrides(root, batch_size):
        # 3 epochs of 3 shuffled steps (4 pairs on one process, 2 per rank on two): each epoch's order is one
        # permutation seeded by data.seed + epoch, which rank r reads from position r in steps of 2, so every
        # run sees the same global batches in every epoch; a fixed length-scale, because the median heuristic
        # depends on how the first batch is split
        return ["--data.train", f"[{data}]", "--data.val_fraction", "0", "--data.max_length", "96",
                "--data.batch_size", str(batch_size), "--model.sngp.num_features", "32",
                "--model.sngp.length_scale", "2.0", "--trainer.default_root_dir", str(tmp_path / root),
                "--trainer.max_epochs", "3", "--finalize.progress", "false"]

    tiny, two_cpus = "configs/pm/debug_tiny.yaml", "configs/trainer/ddp_cpu_2.yaml"
    run_cli([sys.executable, "-m", "lit_route", "fabric", "pm", "--config", tiny, *overrides("one", 4)])
    run_cli([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "lit_route", "fabric",
             "pm", "--config", tiny, "--config", two_cpus, *overrides("two", 2)])
    run_cli([sys.executable, "-m", "lit_route", "pm", "fit", "--config", tiny, "--config", two_cpus,
             "--trainer.logger", "false", "--trainer.enable_progress_bar", "false", *overrides("trainer", 2)])
    one, *others = (torch.load(tmp_path / run / "finalized.ckpt", weights_only=False)["state_dict"]
                    for run in ("one", "two", "trainer"))
    assert float(one["head.n_accumulated"]) == 24 and one["head.beta.weight"].abs().sum() > 0
    lr, steps = 1e-3, 9  # debug_tiny's learning rate; 3 epochs of 3 steps
    for other in others:
        assert other.keys() == one.keys() and float(other["head.n_accumulated"]) == 24
        weights = [k for k in one if one[k].is_floating_point() and k not in GP_STATE]
        diff = torch.cat([(other[k] - one[k]).abs().flatten().double() for k in weights])
        # Gradients averaged over two ranks round differently from one process's batch gradient (and AVX2/AVX-512
        # kernels differ). AdamW moves an element by about lr per step whatever its gradient's size, so an element
        # whose gradient nearly cancels can take a different step (bounded by lr); the rest agree to rounding.
        assert diff.max() <= lr * steps and diff.median() < 1e-7, (diff.max(), diff.median())
        for key in GP_STATE:
            # float64 sums of features from those float32 weights: off-diagonal entries that nearly cancel carry
            # the weights' rounding, so the matrices are compared as a whole (~1e-6 seen; 1e-4 on any x86-64 CPU)
            error = float((other[key] - one[key]).norm() / one[key].norm())
            assert error < 1e-4, (key, error)


def fsdp_worker(rank, world, port, data, out):
    with process_group_member(rank, world, port):
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


def test_unsupported_trainer_option_is_one_line_naming_it(capsys):
    from lit_route.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fabric", "pm", "--config", str(ROOT / "configs/pm/debug_tiny.yaml"), "--trainer.val_check_interval", "5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert err.strip() == "lit-route fabric pm: trainer.val_check_interval: not supported by the Fabric engine " \
                          "(remove it or use the Trainer)"


def _engines_fit(data, tmp_path, head, epochs, batch_size=2, accumulate=2, stop_after=None, min_lr_ratio=0.1):
    """The same module and data fitted by the Trainer and by the Fabric loop; returns both modules and summaries.

    ``stop_after`` fits that many epochs first and resumes each engine from its own checkpoint to ``epochs``.
    """
    from lit_route.callbacks.finalize import FinalizeCovariance
    from lit_route.preference.head_configs import LaplaceConfig

    def build():
        L.seed_everything(0)
        module = PreferenceModule(backbone=BackboneSpec(), lora=LoraSpec(r=4, alpha=8), head=head,
                                  sngp=SNGPConfig(num_features=32), laplace=LaplaceConfig(prior_precision="validation"),
                                  optim=OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=min_lr_ratio))
        return module, PreferenceDataModule(train=data, val_fraction=0.25, max_length=96, batch_size=batch_size)

    def trainer_fit(max_epochs, resume=None):
        module, dm = build()
        finalize = FinalizeCovariance(progress=False)
        trainer = L.Trainer(max_epochs=max_epochs, accumulate_grad_batches=accumulate, gradient_clip_val=1.0,
                            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[finalize, L.pytorch.callbacks.ModelCheckpoint(tmp_path / "t", save_last=True)],
                            default_root_dir=tmp_path / "t")
        trainer.fit(module, dm, ckpt_path=resume)
        return module, {"global_step": trainer.global_step, "finalized_ckpt": finalize.ckpt_path}

    def fabric_fit(max_epochs, resume=None):
        module, dm = build()
        fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[MetricsRecorder()])
        loop = LoopSettings(max_epochs=max_epochs, accumulate_grad_batches=accumulate, gradient_clip_val=1.0,
                            default_root_dir=str(tmp_path / "f"), logger=False)
        return module, fit_preference_model(fabric, module, dm, loop, FinalizeCovariance(progress=False), resume)

    if stop_after is None:
        return trainer_fit(epochs), fabric_fit(epochs)
    trainer_fit(stop_after)
    fabric_first = fabric_fit(stop_after)[1]
    return trainer_fit(epochs, str(tmp_path / "t" / "last.ckpt")), fabric_fit(epochs, fabric_first["last_ckpt"])


def _assert_same_weights(a, b):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            # one process, the same batches, optimiser and schedule: equal up to float32 kernel rounding
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_fabric_loop_trains_as_the_trainer_does_for_every_head(toy_pairs, tmp_path, head):
    """Three epochs (each epoch's shuffle is its own draw), accumulation, clipping, warm-up, the covariance pass
    (Laplace choosing δ on the validation pairs) and the finalised checkpoint every head ends at."""
    data = str(write_pairs(tmp_path / "pairs.jsonl", toy_pairs))
    (trainer_module, t), (fabric_module, f) = _engines_fit(data, tmp_path, head, epochs=3)
    # 9 training pairs: 5 batches of 2 per epoch, accumulated 2 at a time (the last alone): 3 steps per epoch
    assert f["global_step"] == t["global_step"] == 9
    _assert_same_weights(trainer_module, fabric_module)
    for path in (t["finalized_ckpt"], f["finalized_ckpt"]):
        assert Path(path).name == "finalized.ckpt" and Path(path).exists()
    loaded, _ = load_preference_model(f["finalized_ckpt"])
    assert loaded.head_kind == head and loaded.has_uncertainty == trainer_module.has_uncertainty
    if head == "laplace":  # δ from the validation pairs in both engines (not the marginal likelihood's)
        assert float(fabric_module.head.chosen_prior) == float(trainer_module.head.chosen_prior)


def test_a_resumed_fabric_run_sees_the_batches_of_an_uninterrupted_one(toy_pairs, tmp_path):
    """Each epoch's order is a function of the seed and the epoch: stopping after epoch 1 and resuming to epoch 3
    gives the weights of three epochs in one go, under either engine, and both engines agree."""
    data = str(write_pairs(tmp_path / "pairs.jsonl", toy_pairs))
    # a constant learning rate after warm-up: the schedule of a 1-epoch run is then that of a 3-epoch one
    (straight, _), _ = _engines_fit(data, tmp_path / "straight", "linear", epochs=3, accumulate=1, min_lr_ratio=1.0)
    (trainer_resumed, t), (fabric_resumed, f) = _engines_fit(data, tmp_path / "resumed", "linear", epochs=3,
                                                             accumulate=1, stop_after=1, min_lr_ratio=1.0)
    assert t["global_step"] == f["global_step"] == 15  # 5 batches of 2 per epoch
    _assert_same_weights(straight, trainer_resumed)
    _assert_same_weights(straight, fabric_resumed)


def test_fabric_resumed_mid_epoch_trains_each_remaining_batch_once(toy_pairs, tmp_path, monkeypatch):
    """Killed at step 7 (the middle of epoch 2, 5 steps an epoch) and resumed from that `last.ckpt`: the resumed
    run skips exactly the batches epoch 2 had consumed and ends with the weights of an uninterrupted run."""
    import shutil

    import lit_route.fabric.pm as fabric_pm

    data = str(write_pairs(tmp_path / "pairs.jsonl", toy_pairs))
    kept = tmp_path / "step7.ckpt"
    save = fabric_pm.save_checkpoint

    def save_and_keep_step7(fabric, path, *args, **state):
        out = save(fabric, path, *args, **state)
        if Path(path).name == "last.ckpt" and state.get("global_step") == 7:
            shutil.copy(out, kept)  # what a run killed right after step 7 leaves behind
        return out

    monkeypatch.setattr(fabric_pm, "save_checkpoint", save_and_keep_step7)

    def run(root, ckpt_path=None):
        L.seed_everything(0)
        module = PreferenceModule(backbone=BackboneSpec(), lora=LoraSpec(r=4, alpha=8), head="linear",
                                  optim=OptimConfig(lr=1e-2, warmup_steps=2))
        dm = PreferenceDataModule(train=data, val_fraction=0.25, max_length=96, batch_size=2)
        fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[MetricsRecorder()])
        loop = LoopSettings(max_epochs=3, checkpoint_every_n_steps=1, default_root_dir=str(tmp_path / root),
                            logger=False)
        return module, fit_preference_model(fabric, module, dm, loop, ckpt_path=ckpt_path)

    straight, _ = run("straight")
    assert torch.load(kept, weights_only=False)["epoch"] == 1  # saved inside epoch 2 (0-based 1)
    resumed, summary = run("resumed", ckpt_path=str(kept))
    assert summary["global_step"] == 15
    _assert_same_weights(straight, resumed)


def test_sngp_length_scale_with_one_pair_per_batch_is_the_trainers(toy_pairs, tmp_path):
    """One pair per batch: the median heuristic reads the training pairs (a pair's distance to its own twin left
    out) from the datamodule that the Fabric loop connected, as it does from the Trainer's."""
    data = str(write_pairs(tmp_path / "pairs.jsonl", toy_pairs))
    (trainer_module, _), (fabric_module, _) = _engines_fit(data, tmp_path, "sngp", epochs=1, batch_size=1,
                                                            accumulate=1)
    scale = float(trainer_module.head.features.length_scale)
    assert float(fabric_module.head.features.length_scale) == pytest.approx(scale, rel=1e-6)
    _assert_same_weights(trainer_module, fabric_module)


def test_the_readme_loop_runs():
    text = (ROOT / "docs" / "distributed.md").read_text()
    block = text.split("**Your own loop.**", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(block, "docs/distributed.md", "exec"), scope)  # the example as a user copies it
    module = scope["module"]
    assert module.has_uncertainty and int(module.head.n_accumulated) == 32  # 16 pairs, both orders


def test_resume_continues_the_step_count_and_the_optimiser(toy_pairs, tmp_path):
    data = str(write_pairs(tmp_path / "pairs.jsonl", toy_pairs))

    def run(epochs, ckpt_path=None):
        L.seed_everything(0)
        module = PreferenceModule(backbone=BackboneSpec(), lora=LoraSpec(r=4, alpha=8), sngp=SNGPConfig(num_features=16))
        dm = PreferenceDataModule(train=data, val_fraction=0.0, max_length=96, batch_size=4)
        fabric = L.Fabric(accelerator="cpu", devices=1, loggers=[MetricsRecorder()])
        loop = LoopSettings(max_epochs=epochs, default_root_dir=str(tmp_path / "run"))
        return fit_preference_model(fabric, module, dm, loop, ckpt_path=ckpt_path)

    first = run(1)
    saved = torch.load(first["last_ckpt"], weights_only=False)
    assert (saved["global_step"], saved["epoch"]) == (3, 1)  # 12 pairs in batches of 4
    resumed = run(2, ckpt_path=first["last_ckpt"])
    assert resumed["global_step"] == 6  # the second epoch only, not two more
    state = torch.load(resumed["last_ckpt"], weights_only=False)["optimizer"]["state"]
    assert {int(s["step"]) for s in state.values()} == {6}  # AdamW's moments continued from the checkpoint
