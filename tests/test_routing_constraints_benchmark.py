"""``benchmarks/routing_quality.py --task constraints`` end to end on a tiny random backbone: data split by prompt,
feature cache, the hyper-parameter choice on validation prompts, intervals, controls and the risk rows."""

import argparse
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_constraints_routing_table_runs_with_every_row(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import routing_constraints as rc

    from lit_route.models.backbone import BackboneSpec

    monkeypatch.setattr(rc, "SMOLLM2", BackboneSpec(model_path="builtin:tiny-llama"))
    monkeypatch.setattr(rc, "GRIDS", {k: v[:2] for k, v in rc.GRIDS.items()})
    args = argparse.Namespace(work=str(tmp_path), out=str(tmp_path / "out"), cache=str(tmp_path / "cache"),
                              val_share=0.2, seed=0, max_length=64, epochs=1, n_boot=50, risk_alpha=[0.2],
                              methods=["linear", "margin", "sngp"])
    rc.run(args)
    results = json.loads((tmp_path / "out" / "routing_quality_constraints.json").read_text())
    assert results["setup"]["heldout_pairs"] == 669 and results["setup"]["fit_pairs"] + results["setup"]["val_pairs"] == 776
    sngp = results["methods"]["sngp"]
    assert len(sngp["grid"]) == 2 and sngp["intervals"]["resampled"] == "prompt"
    assert sngp["risk"][0]["splits"] == 200 and len(sngp["scores"]["d"]) == 669
    assert set(results["controls"]) == {"length: longest first", "length: shortest first"}
    assert set(results["methods"]) == {"margin", "sngp"}  # the linear head has no ū to route by
    table = (tmp_path / "out" / "routing_quality_constraints.md").read_text()
    assert "ū shuffled across pairs" in table and "Risk-controlled routing" in table
    sys.modules.pop("routing_constraints", None)
    sys.modules.pop("routing_quality", None)
