"""Every `rloo fit` run writes `checkpoints/last.ckpt` (the path the README resumes and exports from), as the Fabric
engine does; the end-to-end check with the shipped config is in test_rloo_resume_epoch.py."""

from pathlib import Path

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_route.cli import _last_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_a_default_checkpoint_saves_last_when_none_is_listed():
    added = _last_checkpoint({"callbacks": []}, [])
    assert len(added) == 1 and isinstance(added[0], ModelCheckpoint) and added[0].save_last is True


def test_a_listed_checkpoint_is_left_as_configured():
    listed = ModelCheckpoint(every_n_train_steps=50, save_top_k=-1)
    assert _last_checkpoint({"callbacks": [listed]}, []) == [] and listed.save_last is None


def test_shipped_rloo_configs_that_list_a_checkpoint_save_last():
    for path in sorted((ROOT / "configs/rloo").glob("*.yaml")):
        callbacks = yaml.safe_load(path.read_text())["trainer"].get("callbacks") or []
        for cb in callbacks:
            if cb["class_path"].endswith("ModelCheckpoint"):
                assert cb["init_args"].get("save_last") is True, path.name


def test_no_checkpoint_where_checkpointing_is_off():
    assert _last_checkpoint({"enable_checkpointing": False, "callbacks": []}, []) == []

