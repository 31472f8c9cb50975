"""``benchmarks/routing_vs_length.py`` end to end on a tiny random backbone: the PM trained from its config, the
choices made on validation prompts, both sets, the shift set's gate, and the summary the lead fills in."""

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_routing_vs_length_runs_both_sets_with_the_gate_first(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import routing_vs_length as rvl

    config = yaml.safe_load((ROOT / "configs/pm/constraints_mean12.yaml").read_text())
    config["model"]["backbone"] = {"model_path": str(tiny_model_dir), "num_layers": 1}
    config["model"]["feature_cache"] = str(tmp_path / "cache")
    config["trainer"].update(max_epochs=1, default_root_dir=str(tmp_path / "pm"), enable_progress_bar=False)
    config["data"]["max_length"] = 96
    path = tmp_path / "pm.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setattr(sys, "argv", ["routing_vs_length.py", "--pm-config", str(path), "--work", str(tmp_path / "w"),
                                      "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache"),
                                      "--n-boot", "20"])
    rvl.main()
    results = json.loads((tmp_path / "out" / "routing_vs_length.json").read_text())
    v = results["validation"]
    assert v["pairs"] == 159 and v["length_by"] in ("sum", "max", "closest", "farthest")
    assert v["best_pm_router"] in rvl.PM_ROUTERS and set(v["learned_models"]) == set(rvl.LEARNED)
    assert results["constraints"]["pairs"] == 669 and "length" in results["constraints"]["routers"]
    shift = results["shift"]
    assert shift["pairs"] == 669 + 332 and "min_words" in shift["pm_accuracy_by_family"]
    assert ("routers" in shift) == shift["gate"]["passed"]  # no comparison when the gate fails
    summary = results["summary"]
    assert summary["constraints"]["on_policy"] is None and set(summary["constraints"]["recovered"]) == {"mid", "lo", "hi"}
    table = (tmp_path / "out" / "routing_vs_length.md").read_text()
    assert "Gate (pre-registered)" in table and table.index("Gate") < table.index("### shift") + 200
    sys.modules.pop("routing_vs_length", None)
    sys.modules.pop("pm_constraints_select", None)
