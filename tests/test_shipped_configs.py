"""Every shipped config on a user's machine: a fresh folder with nothing but the configs (no runs/, no ../shared,
no keys, offline). Each one runs, or stops with one line naming the file (or key, or model) to get first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lit_route.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))

PM_CKPT = "pm_ckpt: runs/{}/finalized.ckpt does not exist; train a PM first"
# config -> (command, what the one line must say)
NEEDS_SOMETHING = {
    "configs/eval/constraints_verifier.yaml": ("evaluate", PM_CKPT.format("pm_constraints")),
    "configs/eval/llmbar_cascade.yaml": ("evaluate", PM_CKPT.format("pm_smollm2_sngp")),
    "configs/eval/llmbar_replay_gpt4.yaml": ("evaluate", PM_CKPT.format("pm_smollm2_sngp")),
    "configs/eval/rewardbench_anthropic.yaml": ("evaluate", "set the environment variable ANTHROPIC_API_KEY"),
    # before: ../shared/data/rm-bench/chat_filtered.json, a folder of the project's machines, not a user's
    "configs/eval/rmbench.yaml": ("evaluate", "data/rm-bench/chat_filtered.json: no such file"),
    "configs/rloo/smollm2_local.yaml": ("rloo fit", PM_CKPT.format("pm_smollm2_sngp")),
    "configs/rloo/constraints.yaml": ("rloo fit", PM_CKPT.format("pm_constraints")),
    "configs/rloo/llama8b_anthropic.yaml": ("rloo fit", PM_CKPT.format("pm_llama8b_sngp")),
    "configs/rloo/smollm2_vllm.yaml": ("rloo fit", PM_CKPT.format("pm_smollm2_sngp")),
    "configs/serve/anthropic.yaml": ("serve", "set the environment variable ANTHROPIC_API_KEY"),
    # before: `OSError: We couldn't connect to 'https://huggingface.co' ...`, naming no model
    "configs/pm/llama8b_sngp_lora.yaml": ("pm fit", "model_path: meta-llama/Llama-3.1-8B-Instruct is not a local folder"),
}
# configs that run from bundled data and installed models; the tests named here run them
RUN_ELSEWHERE = {
    "configs/pm/debug_tiny.yaml": "tests/test_docs.py (the README's tour)",
    "configs/rloo/debug_tiny.yaml": "tests/test_docs.py (the README's tour)",
    "configs/rloo/debug_tiny_budget.yaml": "tests/test_routing_callback.py",
    "configs/pm/smollm2_frozen_uq.yaml": "make demo",
    "configs/pm/smollm2_sngp.yaml": "bundled data and the installed SmolLM2 (parsed in tests/test_configs.py)",
    "configs/pm/constraints_sngp.yaml": "benchmarks/rlhf_downstream.py --pm-config (bundled data)",
    "configs/pm/constraints_laplace.yaml": "benchmarks/rlhf_downstream.py (bundled data)",
    "configs/pm/constraints_sngp_shift.yaml": "bundled data (parsed in tests/test_configs.py)",
    "configs/pm/constraints_mean12.yaml": "benchmarks/routing_vs_length.py (bundled data)",
    "configs/serve/debug_tiny.yaml": "tests/test_reward_server.py",
    "configs/trainer/ddp_cpu_2.yaml": "tests/test_fabric_pm.py, tests/test_rloo_ddp.py",
    "configs/trainer/fsdp.yaml": "a GPU strategy (parsed in tests/test_configs.py)",
    "configs/trainer/deepspeed_zero2.yaml": "a GPU strategy (parsed in tests/test_configs.py)",
}


def test_every_shipped_config_is_accounted_for():
    assert sorted({*NEEDS_SOMETHING, *RUN_ELSEWHERE}) == CONFIGS


def test_no_shipped_config_points_outside_the_users_folder():
    for config in CONFIGS:
        assert "shared/" not in (ROOT / config).read_text(), config


@pytest.mark.parametrize("config", sorted(NEEDS_SOMETHING))
def test_a_config_that_needs_a_file_names_it_in_one_line(config, tmp_path, monkeypatch, capsys):
    command, expected = NEEDS_SOMETHING[config]
    if "llama8b_sngp" in config:
        from huggingface_hub import try_to_load_from_cache

        if try_to_load_from_cache("meta-llama/Llama-3.1-8B-Instruct", "config.json"):
            pytest.skip("the 8B model is in this machine's Hugging Face cache")
    for name in ("LIT_ROUTE_PM_CKPT", "RMBENCH_DIR", "REWARDBENCH_FILE", "ANTHROPIC_API_KEY", "LIT_ROUTE_TRAIN",
                 "LIT_ROUTE_BASE_MODEL", "LIT_ROUTE_PROMPTS", "JUDGE_BASE_URL", "JUDGE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main([*command.split(), "--config", config])
    err = re.sub(r"--- Logging error ---\n.*?\nArguments: [^\n]*\n", "", capsys.readouterr().err, flags=re.S)
    lines = [line for line in err.splitlines() if line.startswith("lit-route: error:")]
    assert stop.value.code == 1 and len(lines) == 1 and expected in lines[0], err[-1500:]
    assert "  File " not in err  # no traceback
