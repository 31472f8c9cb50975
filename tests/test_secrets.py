"""An API key never reaches a log, a saved config, hyperparameters, a checkpoint or a results file."""

from pathlib import Path

import yaml
from loopback import Loopback

from lit_route.cli import main

SENTINEL = "sk-ant-SENTINEL-7f3a9c1e"


def scan(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and SENTINEL.encode() in p.read_bytes()]


def test_sentinel_key_appears_in_no_artefact(tmp_path, monkeypatch, capsys, caplog):
    monkeypatch.setenv("ANTHROPIC_API_KEY", SENTINEL)
    with Loopback() as server:
        config = yaml.safe_load(Path("configs/rloo/debug_tiny.yaml").read_text())
        config["trainer"]["callbacks"][0]["init_args"]["judge"] = {
            "class_path": "lit_route.judges.AnthropicJudge",
            "init_args": {"model": "claude-test", "base_url": server.url},
        }
        config["trainer"]["default_root_dir"] = str(tmp_path / "rloo")
        config["trainer"]["max_steps"] = 2
        config["trainer"]["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                               "init_args": {"every_n_train_steps": 1}})
        (tmp_path / "rloo.yaml").write_text(yaml.safe_dump(config))
        main(["rloo", "fit", "--config", str(tmp_path / "rloo.yaml")])
        # it was used (the SDK sends it as x-api-key or as a bearer token, depending on its version)
        assert server.requests and all(any(SENTINEL in v for v in r["headers"].values()) for r in server.requests)
        scores = tmp_path / "scores.jsonl"
        scores.write_text("".join(f'{{"id": "Adversarial-GPTOut:{line}", "score": 0.1, "uncertainty": 1.2}}\n'
                                  for line in (2, 8, 14)))
        main(["evaluate", "--config", "configs/eval/rewardbench_anthropic.yaml", "--pm_ckpt", "null",
              "--scores", str(scores), "--data", "[bundled:llmbar/Adversarial-GPTOut.json]", "--limit_per_file", "3",
              "--output_dir", str(tmp_path / "eval"), "--cache", str(tmp_path / "eval" / "cache.sqlite"),
              "--judge.init_args.base_url", server.url])
    assert list((tmp_path / "rloo").rglob("*.ckpt")) and (tmp_path / "eval" / "results.json").exists()
    assert list((tmp_path / "rloo").rglob("config.yaml")) and list((tmp_path / "rloo").rglob("hparams.yaml"))
    assert scan(tmp_path) == []
    out = capsys.readouterr()
    assert SENTINEL not in out.out + out.err + caplog.text
