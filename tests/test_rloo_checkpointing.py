"""Every `rloo fit` run writes `checkpoints/last.ckpt` (the path the README resumes and exports from), as the Fabric
engine does; the end-to-end check with the shipped config is in test_rloo_resume_epoch.py."""

from lightning.pytorch.callbacks import ModelCheckpoint

from lit_route.cli import _last_checkpoint


def test_a_default_checkpoint_saves_last_when_none_is_listed():
    added = _last_checkpoint({"callbacks": []}, [])
    assert len(added) == 1 and isinstance(added[0], ModelCheckpoint) and added[0].save_last is True


def test_a_listed_checkpoint_saves_last_unless_told_not_to():
    cadence = ModelCheckpoint(every_n_train_steps=50, save_top_k=-1)  # configs/rloo/llama8b_anthropic.yaml
    refused = ModelCheckpoint(save_last=False)
    assert _last_checkpoint({"callbacks": [cadence, refused]}, []) == []  # nothing added next to them
    assert cadence.save_last is True and refused.save_last is False


def test_no_checkpoint_where_checkpointing_is_off():
    assert _last_checkpoint({"enable_checkpointing": False, "callbacks": []}, []) == []

