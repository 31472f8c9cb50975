"""What a run prints is what a user can act on: no notices repeated on every run, no object addresses."""

from __future__ import annotations

import logging
import warnings

import pytest

from lit_route.artefacts.provenance import judge_label


def test_pm_fit_does_not_say_weights_only_was_not_set(tmp_path, capsys, caplog):
    from lit_route.cli import main

    caplog.set_level(logging.INFO)
    main(["pm", "fit", "--config", "configs/pm/debug_tiny.yaml", "--data.limit_per_file", "6",
          "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(tmp_path / "run")])
    assert (tmp_path / "run" / "finalized.ckpt").is_file()
    # before: "`weights_only` was not set, defaulting to `False`." twice (finalised checkpoint and its copy)
    assert "weights_only" not in capsys.readouterr().err + caplog.text


def test_bundled_datas_known_bad_records_are_not_a_warning_but_a_users_are(tmp_path, caplog):
    import shutil

    from lit_route.data import load_pairs
    from lit_route.data.io import resolve_path

    caplog.set_level(logging.INFO, logger="lit_route")
    load_pairs("bundled:hh-rlhf/harmless-base-test.jsonl.gz", skip_invalid=True, limit=200)
    # before: "skipped 3 invalid records (skip_invalid=True)" as a WARNING on every run on the bundled HH data
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("invalid records of bundled data" in r.getMessage() for r in caplog.records)
    caplog.clear()
    mine = tmp_path / "hh.jsonl.gz"
    shutil.copy(resolve_path("bundled:hh-rlhf/harmless-base-test.jsonl.gz"), mine)
    load_pairs(str(mine), skip_invalid=True, limit=200)
    assert [r for r in caplog.records if r.levelno == logging.WARNING and "skipped" in r.getMessage()]


def test_a_custom_judge_is_named_by_class_name_and_model():
    class MyJudge:  # the protocol's members, no __repr__
        name, model = "mine", "my-model-1"

    class Described(MyJudge):
        def __repr__(self):
            return "Described(x=1)"

    # before: `<tests.test_noise.MyJudge object at 0x7f...>` in results.json and on the console
    assert judge_label(MyJudge()) == "MyJudge(name='mine', model='my-model-1')"
    assert judge_label(Described()) == "Described(x=1)"


@pytest.mark.filterwarnings("default")
def test_lightnings_sync_dist_hint_is_not_shown():
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    from lit_route.cli import _setup_logging

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _setup_logging()
        warnings.warn("It is recommended to use `self.log('val/accuracy', ..., sync_dist=True)` when logging on "
                      "epoch level in distributed setting to accumulate the metric across devices.",
                      PossibleUserWarning, stacklevel=1)
        warnings.warn("another warning", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["another warning"]
