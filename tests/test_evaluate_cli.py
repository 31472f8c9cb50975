import json

import pytest

from lit_route.cli import main


def test_pm_fit_score_and_evaluate_end_to_end(tmp_path, tiny_model_dir):
    root = tmp_path / "run"
    main(["pm", "fit", "--config", "configs/pm/debug_tiny.yaml", "--trainer.default_root_dir", str(root),
          "--trainer.max_epochs", "1", "--data.limit_per_file", "12", "--model.backbone.model_path", str(tiny_model_dir),
          "--trainer.enable_progress_bar", "false"])
    ckpt = root / "finalized.ckpt"  # the stable copy, beside the versioned one
    assert len(list(root.rglob("finalized.ckpt"))) == 2
    scores = tmp_path / "scores.jsonl"
    main(["pm", "score", "--pm_ckpt", str(ckpt), "--data", "[bundled:llmbar/Adversarial-GPTOut.json]", "--output", str(scores),
          "--limit_per_file", "9"])
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(rows) == 9 and set(rows[0]) == {"id", "subset", "score", "uncertainty", "correct"}
    assert all(r["uncertainty"] >= 1.0 for r in rows)
    out = tmp_path / "eval"
    main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm_ckpt", "null", "--scores", str(scores),
          "--data", "[bundled:llmbar/Adversarial-GPTOut.json]", "--limit_per_file", "9", "--output_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["n_pairs"] == 9
    for key in ("uncertainty", "random", "margin", "oracle"):
        assert len(results["curves"][key]) == len(results["fractions"]) == 21
        assert key in results["area_under_curve"]
    curves = results["curves"]
    assert curves["uncertainty"][0] == results["pm_accuracy"] and curves["uncertainty"][-1] == results["judge_accuracy"]
    assert (out / "routing_curve.png").exists() and (out / "by_decile.png").exists() and (out / "curves.csv").exists()


def _strict(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def write_scores(path, pairs, score=lambda i: 0.3, uncertainty=lambda i: 1.0 + i / 100):
    path.write_text("".join(json.dumps({"id": p.id, "score": score(i), "uncertainty": uncertainty(i)}) + "\n"
                            for i, p in enumerate(pairs)))
    return path


def test_results_are_strict_json_with_fewer_pairs_than_deciles(tmp_path):
    from lit_route.data import load_pairs

    pairs = load_pairs("bundled:llmbar/Natural.json", limit=6)
    scores = write_scores(tmp_path / "s.jsonl", pairs)
    main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm_ckpt", "null", "--scores", str(scores),
          "--data", "[bundled:llmbar/Natural.json]", "--limit_per_file", "6", "--output_dir", str(tmp_path / "e")])
    results = _strict((tmp_path / "e" / "results.json").read_text())
    assert results["by_decile"]["pm_accuracy"].count(None) == 4  # 6 pairs fill 6 of the 10 deciles


def test_non_finite_scores_are_refused_with_file_and_line(tmp_path, capsys):
    from lit_route.data import load_pairs

    pairs = load_pairs("bundled:llmbar/Natural.json", limit=5)
    scores = write_scores(tmp_path / "s.jsonl", pairs, score=lambda i: float("nan") if i == 3 else 0.1)
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm_ckpt", "null", "--scores", str(scores),
              "--data", "[bundled:llmbar/Natural.json]", "--limit_per_file", "5", "--output_dir", str(tmp_path / "e")])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{scores}:4: field 'score': not a finite number" in err[0]


def test_evaluate_fails_loudly_when_the_judge_gives_no_verdicts_but_keeps_the_results(tmp_path, capsys):
    from lit_route.data import load_pairs

    pairs = load_pairs("bundled:llmbar/Natural.json", limit=8)
    scores = write_scores(tmp_path / "s.jsonl", pairs)
    verdicts = tmp_path / "v.jsonl"  # a verdict file with nothing for these pairs: every call fails
    verdicts.write_text(json.dumps({"judge": "J", "prompt": "p", "response_a": "a", "response_b": "b", "winner": "A"}))
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm_ckpt", "null", "--scores", str(scores),
              "--data", "[bundled:llmbar/Natural.json]", "--limit_per_file", "8", "--output_dir", str(tmp_path / "e"),
              "--judge.init_args.path", str(verdicts), "--judge.init_args.judge", "J"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "8 of 8 pairs got no verdict (no_record: 16)" in err
    assert _strict((tmp_path / "e" / "results.json").read_text())["judge_failed_pairs"] == 8


def test_cli_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c"}\n')
    with pytest.raises(SystemExit) as exit_:
        main(["pm", "score", "--pm_ckpt", str(bad), "--data", "[bundled:llmbar/Natural.json]", "--output", "x.jsonl"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lit-route: error: pm_ckpt: {bad} is not a readable checkpoint")
    with pytest.raises(Exception, match="not a readable checkpoint"):
        main(["pm", "score", "--pm_ckpt", str(bad), "--data", "[bundled:llmbar/Natural.json]", "--output", "x.jsonl",
              "--debug"])


def test_pm_fit_without_a_model_is_refused(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    with pytest.raises(SystemExit):
        main(["pm", "fit", "--data.train", f"[{data}]", "--trainer.default_root_dir", str(tmp_path / "run")])
    assert "backbone: no base model given" in capsys.readouterr().err


def test_shipped_configs_find_the_checkpoint_pm_fit_writes(tmp_path, tiny_model_dir, monkeypatch):
    """The eval config's default ``pm`` path is where ``pm fit`` with the SmolLM2 config's root leaves it."""
    import shutil
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shutil.copytree(root / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LIT_ROUTE_PM_CKPT", raising=False)
    main(["pm", "fit", "--config", "configs/pm/debug_tiny.yaml", "--trainer.default_root_dir", "runs/pm_smollm2_sngp",
          "--trainer.max_epochs", "1", "--data.limit_per_file", "8", "--model.backbone.model_path", str(tiny_model_dir),
          "--trainer.enable_progress_bar", "false"])
    assert Path("runs/pm_smollm2_sngp/finalized.ckpt").exists()
    main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--limit_per_file", "4",
          "--output_dir", "runs/eval", "--progress", "false"])
    assert _strict(Path("runs/eval/results.json").read_text())["n_pairs"] == 20


def test_pm_fit_logs_to_tensorboard_through_the_extra(tmp_path, tiny_model_dir):
    root = tmp_path / "run"
    main(["pm", "fit", "--config", "configs/pm/debug_tiny.yaml", "--trainer.default_root_dir", str(root),
          "--trainer.max_epochs", "1", "--data.limit_per_file", "8", "--model.backbone.model_path", str(tiny_model_dir),
          "--trainer.enable_progress_bar", "false", "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
          "--trainer.logger.save_dir", str(root)])
    assert list(root.rglob("events.out.tfevents.*"))


def test_evaluate_writes_intervals_the_paired_difference_and_the_risk_row(tmp_path, capsys):
    from lit_route.data import load_pairs

    pairs = load_pairs("bundled:llmbar/Natural.json", limit=60)
    # the PM is wrong on the pairs it is least sure of (ū falls with |d|)
    scores = write_scores(tmp_path / "s.jsonl", pairs, score=lambda i: (i % 5) - 1.0,
                          uncertainty=lambda i: 1.0 + 1.0 / (0.5 + abs((i % 5) - 1.0)))
    out = tmp_path / "e"
    main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm_ckpt", "null", "--scores", str(scores),
          "--data", "[bundled:llmbar/Natural.json]", "--limit_per_file", "60", "--output_dir", str(out),
          "--n_boot", "200", "--risk_alpha", "0.2", "--risk_splits", "20", "--cache", "null"])
    results = _strict((out / "results.json").read_text())
    iv = results["intervals"]
    assert iv["resampled"] == "pair" and iv["units"] == 60 and iv["n_boot"] == 200  # one pair per prompt
    assert iv["point"]["curves"] == results["curves"]
    f = len(results["fractions"])
    for lo, hi in zip(iv["lo"]["difference_uncertainty_random"], iv["hi"]["difference_uncertainty_random"], strict=True):
        assert lo <= hi
    assert len(iv["separated"]) == f and iv["lo"]["auroc_uncertainty"] <= results["metrics"]["auroc_uncertainty"]
    assert results["risk"]["splits"] == 20 and 0 <= results["risk"]["held"] <= 1
    table = (out / "results.md").read_text()
    assert "uncertainty − random" in table and "risk-controlled routing" in table
    assert (out / "difference.png").exists()
    printed = capsys.readouterr().out
    assert "95% intervals, 200 bootstrap redraws of 60 pairs" in printed
    # the length-only control is reported by default, with each PM router's paired difference against it
    assert len(results["curves"]["length"]) == f and results["routers"]["length"].startswith("length-only control")
    assert set(iv["point"]["recovered_vs_length"]) == {"uncertainty", "margin"}
    assert "uncertainty − length" in table and "| length |" in table and "− length" in printed
    assert (out / "curves.csv").read_text().splitlines()[0].startswith("fraction,uncertainty,random,margin,oracle,length,")


def test_evaluate_routes_by_a_delegation_model_beside_the_length_control(tmp_path):
    from lit_route.data import load_pairs
    from lit_route.uncertainty.delegation import DelegationModel

    pairs = load_pairs("bundled:llmbar/Natural.json", limit=40)
    scores = write_scores(tmp_path / "s.jsonl", pairs, score=lambda i: (i % 5) - 1.0, uncertainty=lambda i: 1.0 + i % 7)
    model = tmp_path / "delegation.json"
    # P(wrong) falls with |d| only: the learned router ranks pairs as the margin router does
    DelegationModel(("abs_d", "log_len_sum"), [0.0, 0.0], [1.0, 1.0], [-2.0, 0.0], 0.0, {}).save(model)
    out = tmp_path / "e"
    main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm_ckpt", "null", "--scores", str(scores),
          "--data", "[bundled:llmbar/Natural.json]", "--limit_per_file", "40", "--output_dir", str(out),
          "--n_boot", "50", "--cache", "null", "--delegation", str(model), "--length_by", "closest"])
    results = _strict((out / "results.json").read_text())
    iv = results["intervals"]
    assert iv["priorities"] == ["length", "learned"] and "learned" in iv["point"]["recovered_vs_length"]
    # ties in |d| are broken at random in expectation, not by position: the areas agree, not every point
    assert results["area_under_curve"]["learned"] == pytest.approx(results["area_under_curve"]["margin"], abs=0.02)
    assert "closest" in results["routers"]["length"] and "abs_d, log_len_sum" in results["routers"]["learned"]
    assert "learned − length" in (out / "results.md").read_text()


def test_evaluate_refuses_an_unreadable_delegation_model_before_judging(tmp_path, capsys):
    bad = tmp_path / "m.json"
    bad.write_text("{}")
    with pytest.raises(SystemExit):
        main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm_ckpt", "null", "--scores", "x",
              "--delegation", str(bad), "--output_dir", str(tmp_path / "e")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"delegation: {bad} is not a delegation model file" in err[0]


def test_evaluate_refuses_a_risk_level_outside_0_1_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm_ckpt", "null", "--scores", "x",
              "--risk_alpha", "1.5", "--output_dir", str(tmp_path)])
    assert exit_.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lit-route: error: risk_alpha: expected a number in (0, 1")


def test_evaluate_takes_the_risk_threshold_from_a_labelled_calibration_file(tmp_path, capsys):
    from lit_route.data import load_pairs

    pairs = load_pairs("bundled:llmbar/Natural.json", limit=40)
    scores = write_scores(tmp_path / "s.jsonl", pairs, score=lambda i: 1.0, uncertainty=lambda i: i / 40)
    # calibration: 400 labelled pairs whose PM is wrong exactly when ū > 0.5
    calibration = tmp_path / "cal.jsonl"
    calibration.write_text("".join(json.dumps({"uncertainty": i / 400, "correct": i / 400 <= 0.5}) + "\n"
                                   for i in range(400)))
    out = tmp_path / "e"
    main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm_ckpt", "null", "--scores", str(scores),
          "--data", "[bundled:llmbar/Natural.json]", "--limit_per_file", "40", "--output_dir", str(out),
          "--n_boot", "0", "--risk_alpha", "0.1", "--risk_splits", "5", "--risk_calibration", str(calibration),
          "--cache", "null"])
    row = _strict((out / "results.json").read_text())["risk"]["from_file"]
    # the risk among ū ≤ τ is (τ − 0.5)/τ past 0.5: τ lands in [0.5, 0.556], so pairs with ū above it are judged
    assert row["calibration_pairs"] == 400 and 0.5 <= row["tau"] <= 0.5 / 0.9
    assert row["judged_fraction"] == pytest.approx(sum(i / 40 > row["tau"] for i in range(40)) / 40)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"uncertainty": 1.0}\n')
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm_ckpt", "null", "--scores",
              str(scores), "--data", "[bundled:llmbar/Natural.json]", "--limit_per_file", "40", "--output_dir",
              str(tmp_path / "e2"), "--n_boot", "0", "--risk_alpha", "0.1", "--risk_calibration", str(bad),
              "--cache", "null"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lit-route: error: {bad}:1: not a score line")
    assert not (tmp_path / "e2" / "results.json").exists()  # refused before judging anything
