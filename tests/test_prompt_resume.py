"""A killed RLOO run resumed from its last checkpoint trains on exactly the prompts an uninterrupted run sees."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def rloo_config(tmp: Path, name: str, max_steps: int, kill_at: int | None) -> Path:
    config = yaml.safe_load((ROOT / "configs/rloo/debug_tiny.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(default_root_dir=str(tmp / name), max_steps=max_steps, logger=False, enable_progress_bar=False)
    trainer["callbacks"] = [
        {"class_path": "prompt_log.PromptLog", "init_args": {"path": str(tmp / f"{name}.jsonl")}},
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"dirpath": str(tmp / name / "ckpt"), "every_n_train_steps": 1, "save_top_k": -1}},
    ]
    if kill_at is not None:
        trainer["callbacks"].append({"class_path": "prompt_log.KillAt", "init_args": {"step": kill_at}})
    config["model"]["generation"]["max_new_tokens"] = 2
    config["data"].update(limit=6, batch_size=2)  # 3 steps per epoch: the run crosses an epoch boundary
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(TESTS)])}
    cmd = [sys.executable, "-m", "lit_route", "rloo", "fit", "--config", str(config), *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, timeout=600)


def steps(path: Path) -> list[tuple[int, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [(row["step"], json.dumps(m, sort_keys=True)) for row in rows for m in row["messages"]]


def test_killed_and_resumed_run_sees_what_an_uninterrupted_run_sees(tmp_path):
    total, kill_at = 5, 4  # killed in the second epoch, its step-5 batch already prefetched
    full = run(rloo_config(tmp_path, "full", total, None))
    assert full.returncode == 0, full.stderr.decode()[-2000:]
    killed = run(rloo_config(tmp_path, "killed", total, kill_at))
    assert killed.returncode == -9
    last = tmp_path / "killed" / "ckpt" / f"epoch=1-step={kill_at}.ckpt"
    assert last.exists(), sorted(p.name for p in (tmp_path / "killed" / "ckpt").iterdir())
    resumed = run(rloo_config(tmp_path, "killed", total, None), "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert b"dataloader is not resumable" not in resumed.stderr
    expected = steps(tmp_path / "full.jsonl")
    got = steps(tmp_path / "killed.jsonl")
    assert len(expected) == 2 * total
    assert got == expected  # same prompts at the same steps: none replayed, none skipped


def test_sampler_shards_disjointly_and_skips_what_was_consumed():
    from lit_route.data.sampler import ResumableSampler

    data = list(range(11))
    ranks = [list(ResumableSampler(data, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert not set(ranks[0]) & set(ranks[1]) and len(ranks[0]) == len(ranks[1]) == 5  # 11 -> 10, evenly
    order = [i for pair in zip(*ranks, strict=True) for i in pair]  # the shared permutation, interleaved
    resumed = [ResumableSampler(data, num_replicas=2, rank=r, seed=3, skip=4, skip_epoch=0) for r in range(2)]
    assert [i for pair in zip(*map(list, resumed), strict=True) for i in pair] == order[4:]
    assert len(resumed[0]) == 5  # the whole epoch's length: a Trainer counts the restored batches against it
    for s in resumed:
        s.set_epoch(1)  # a new epoch starts from its beginning, in a new order
    epoch1 = [i for pair in zip(*map(list, resumed), strict=True) for i in pair]
    assert len(epoch1) == 10 and len(set(epoch1)) == 10 and epoch1 != order


def test_sampler_takes_its_epoch_from_the_trainer_when_told():
    """Resumed after ``max_steps`` stopped a run mid-epoch, Lightning calls ``set_epoch(epochs processed)``, one
    ahead of the epoch it continues; the sampler follows the Trainer's ``current_epoch`` instead."""
    from lit_route.data.sampler import ResumableSampler

    data = list(range(8))
    plain = ResumableSampler(data, seed=3, skip=2, skip_epoch=0)
    told = ResumableSampler(data, seed=3, skip=2, skip_epoch=0, current_epoch=lambda: 0)
    plain.set_epoch(1)
    told.set_epoch(1)
    assert told.epoch == 0 and list(told) == list(ResumableSampler(data, seed=3))[2:]  # epoch 0, after the skip
    assert plain.epoch == 1 and len(list(plain)) == 8  # without it: epoch 1's order, from its start
