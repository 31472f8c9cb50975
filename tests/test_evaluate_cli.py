import json

from lit_route.cli import main


def test_pm_fit_score_and_evaluate_end_to_end(tmp_path, tiny_model_dir):
    root = tmp_path / "run"
    main(["pm", "fit", "--config", "configs/pm/debug_tiny.yaml", "--trainer.default_root_dir", str(root),
          "--trainer.max_epochs", "1", "--data.limit_per_file", "12", "--model.backbone.model_path", str(tiny_model_dir),
          "--trainer.enable_progress_bar", "false"])
    (ckpt,) = root.rglob("finalized.ckpt")
    scores = tmp_path / "scores.jsonl"
    main(["pm", "score", "--ckpt", str(ckpt), "--data", "[bundled:llmbar/Adversarial-GPTOut.json]", "--output", str(scores),
          "--limit_per_file", "9"])
    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert len(rows) == 9 and set(rows[0]) == {"id", "subset", "score", "uncertainty", "correct"}
    assert all(r["uncertainty"] >= 1.0 for r in rows)
    out = tmp_path / "eval"
    main(["evaluate", "--config", "configs/eval/llmbar_replay_gpt4.yaml", "--pm", "null", "--scores", str(scores),
          "--data", "[bundled:llmbar/Adversarial-GPTOut.json]", "--limit_per_file", "9", "--output_dir", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["n_pairs"] == 9
    for key in ("uncertainty", "random", "margin", "oracle"):
        assert len(results["curves"][key]) == len(results["fractions"]) == 21
        assert key in results["area_under_curve"]
    curves = results["curves"]
    assert curves["uncertainty"][0] == results["pm_accuracy"] and curves["uncertainty"][-1] == results["judge_accuracy"]
    assert (out / "routing_curve.png").exists() and (out / "by_decile.png").exists() and (out / "curves.csv").exists()
