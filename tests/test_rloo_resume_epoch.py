"""`rloo fit` (the Trainer) stopped at any step of an epoch and resumed from its `last.ckpt` trains every prompt of
the epoch exactly once, at the steps an uninterrupted run trains them.

The runs are the user's: `lit-route rloo fit --config configs/rloo/debug_tiny.yaml` (16 prompts, 2 per step: 8 steps
an epoch), stopped cleanly by `max_steps`, then resumed with `--ckpt_path .../last.ckpt`. They run in-process
(`lit_route.cli.main`) with 2 new tokens per sample to stay fast; a callback records the prompts of every step.
"""

import json
from pathlib import Path

import pytest

from lit_route.cli import main

ROOT = Path(__file__).resolve().parents[1]
EPOCH = 8  # steps per epoch: 16 prompts, batch 2
TOTAL = EPOCH + 1  # one step into epoch 1: the next epoch starts afresh after a resumed one


def fit(root: Path, max_steps: int, resume: bool = False) -> None:
    """One `rloo fit` into ``root``; ``resume``: from the ``last.ckpt`` the previous one wrote there."""
    ckpt = []
    if resume:
        last = max(root.glob("lightning_logs/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        ckpt = ["--ckpt_path", str(last)]
    main(["rloo", "fit", "--config", str(ROOT / "configs/rloo/debug_tiny.yaml"),
          f"--trainer.default_root_dir={root}", f"--trainer.max_steps={max_steps}",
          "--trainer.enable_progress_bar=false", "--model.generation.max_new_tokens=2",
          "--trainer.callbacks+=prompt_log.PromptLog", f"--trainer.callbacks.path={root}/prompts.jsonl", *ckpt])


def trained(root: Path) -> list[tuple[int, int, str]]:
    """(step, epoch, prompt) of every prompt a finished step trained on, in order."""
    rows = [json.loads(line) for line in (root / "prompts.jsonl").read_text().splitlines()]
    return [(row["step"], row["epoch"], json.dumps(m, sort_keys=True)) for row in rows for m in row["messages"]]


def epoch_prompts(rows: list[tuple[int, int, str]], epoch: int) -> list[str]:
    return [p for _, e, p in rows if e == epoch]


def check_against(got, uninterrupted) -> None:
    assert [s for s, _, _ in got] == [s for s in range(1, TOTAL + 1) for _ in range(2)]  # no step lost or repeated
    assert sorted(epoch_prompts(got, 0)) == sorted(epoch_prompts(uninterrupted, 0))  # each prompt once, none lost
    assert got == uninterrupted  # the same prompts at the same steps and epochs, into the next epoch


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[tuple[int, int, str]]:
    root = tmp_path_factory.mktemp("uninterrupted")
    fit(root, TOTAL)
    got = trained(root)
    assert [s for s, e, _ in got if e == 0] == [s for s in range(1, EPOCH + 1) for _ in range(2)]
    assert len(set(epoch_prompts(got, 0))) == 2 * EPOCH  # the reference itself: 16 distinct prompts in epoch 0
    return got


def test_stopped_in_the_first_half_and_resumed_to_the_next_epoch(tmp_path, uninterrupted):
    """The reported case: stopped at step 2, resumed; epoch 0 closed at step 6 and 4 prompts were never trained."""
    fit(tmp_path, 2)
    assert (tmp_path / "lightning_logs/version_0/checkpoints/last.ckpt").is_file()  # the path the README shows
    fit(tmp_path, TOTAL, resume=True)
    check_against(trained(tmp_path), uninterrupted)


def test_stopped_and_resumed_at_every_step(tmp_path, uninterrupted):
    """Stopped at every step 1..8 (8: the end of the epoch) and resumed each time: a chain of nine runs, each
    resumed from the previous one's `last.ckpt`, trains what the uninterrupted run trains."""
    fit(tmp_path, 1)
    for stop in range(1, TOTAL):
        fit(tmp_path, stop + 1, resume=True)
        assert len(list(tmp_path.glob("lightning_logs/version_*"))) == stop + 1
    check_against(trained(tmp_path), uninterrupted)
