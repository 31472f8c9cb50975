"""Every YAML under configs/ parses through its CLI (types checked, nothing instantiated)."""

from pathlib import Path

import pytest

from lit_route.uncertainty import HEADS

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def parse_only(cli_factory, args):
    from lightning.pytorch.cli import LightningCLI

    original = LightningCLI.instantiate_classes
    LightningCLI.instantiate_classes = lambda self: None
    try:
        return cli_factory(args, run=False)
    finally:
        LightningCLI.instantiate_classes = original


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "pm"], ids=lambda p: p.name)
def test_pm_configs_parse(path):
    from lit_route.cli import pm_cli

    cli = parse_only(pm_cli, ["--config", str(path)])
    assert cli.config["model"]["head"] in HEADS


def test_every_config_is_covered():
    known = {"pm", "rloo", "eval", "trainer", "serve"}
    assert CONFIGS and all(p.parent.name in known for p in CONFIGS)


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "eval"], ids=lambda p: p.name)
def test_eval_configs_parse(path):
    from lit_route.eval.run import evaluate_cli

    cfg = evaluate_cli(["--config", str(path)], run=False)
    assert cfg.judge.class_path.startswith("lit_route.judges.")
    assert cfg.data and cfg.order in ("both", "random", "fixed")


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "serve"], ids=lambda p: p.name)
def test_serve_configs_parse(path):
    from lit_route.integrations.server import serve_cli

    cfg = serve_cli(["--config", str(path)], run=False)
    assert cfg.judge.class_path.startswith("lit_route.judges.") and 0 < cfg.fraction <= 1


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "rloo"], ids=lambda p: p.name)
def test_rloo_configs_parse(path):
    from lit_route.cli import rloo_cli

    cli = parse_only(rloo_cli, ["--config", str(path)])
    assert cli.config["model"]["generation"]["num_samples"] >= 2


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name == "trainer"], ids=lambda p: p.name)
def test_trainer_configs_parse_with_a_model_config(path):
    from lit_route.cli import pm_cli

    cli = parse_only(pm_cli, ["--config", "configs/pm/debug_tiny.yaml", "--config", str(path)])
    assert cli.config["trainer"]["devices"] in (2, 8)
