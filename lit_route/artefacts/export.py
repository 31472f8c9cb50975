"""``lit-route export``: a PM or policy checkpoint as a folder that transformers, peft and lit-route all load.

A preference model becomes::

    adapter_config.json, adapter_model.safetensors   the LoRA adapters (peft ``save_pretrained``)
      or config.json, model.safetensors              the whole backbone (``merge: true``, or trained without LoRA)
    head.safetensors                                 the head: weights, random features, GP precision/covariance
    lit_route.json                                   how to rebuild it: head options, mode, encoder, base model
    tokenizer files
    base_model/                                      only for ``builtin:tiny-llama``: the base itself

and a policy the same without the head (``merge: true`` gives a plain causal LM folder that any transformers
user or server loads). ``lit_route.json``'s ``base_model.path`` is what ``from_pretrained`` takes for the base
(a folder, or a hub id), with ``base_model.gguf_file`` when the base is a GGUF file in that folder: ``pkg:``
names are resolved to their package's folder, and the in-memory ``builtin:tiny-llama`` is written out. A base
inside the export (``base_model/``) is recorded relative to the export folder, here and as
``adapter_config.json``'s ``base_model_name_or_path``, with ``base_model.in_export`` true: the folder loads
after it is moved or copied. Load an
exported PM with :func:`load_exported_pm` (or pass the folder wherever lit-route takes a PM checkpoint), or by
hand (``docs/export.md``, run by the tests)::

    base = config["base_model"]
    path = FOLDER / base["path"] if base["in_export"] else base["path"]
    backbone = AutoModel.from_pretrained(path, gguf_file=base["gguf_file"], revision=base["revision"])
    backbone = PeftModel.from_pretrained(backbone, FOLDER)
    options = dict(config["head"])
    head = build_head(options.pop("kind"), options.pop("in_features"), **options).eval()  # eval, then load
    head.load_state_dict(load_file(FOLDER / "head.safetensors"))
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from lit_route.models.backbone import (
    BackboneSpec,
    LoraSpec,
    apply_lora,
    describe,
    load_backbone,
    load_tokenizer,
    resolve_model_dir,
)
from lit_route.models.tiny import TINY_SPEC, save_tiny_llama

EXPORT_CONFIG = "lit_route.json"
HEAD_FILE = "head.safetensors"
BUILTIN_BASE_DIR = "base_model"  # where an adapter export of builtin:tiny-llama keeps its base


def _base_model_entry(spec: BackboneSpec, output: Path) -> dict:
    """What the checkpoint records about the base (:func:`describe`), plus ``path``: what ``from_pretrained``
    takes for it (with ``gguf_file`` when the base is a GGUF file in that folder).

    ``pkg:`` names become their package's folder and local folders absolute paths (hub ids stay as they are);
    ``builtin:tiny-llama`` exists only in memory, so it is written into ``output`` (it is seeded: the same
    weights every time). A base folder inside ``output`` is recorded relative to it, with ``in_export`` true:
    an absolute path would point at the place the export was written, not where it is read.
    """
    entry = describe(spec)
    if spec.model_path == TINY_SPEC:
        path = str(save_tiny_llama(output / BUILTIN_BASE_DIR))
    else:
        path = resolve_model_dir(spec.model_path)
    entry["in_export"] = False
    if not Path(path).is_dir():  # a hub id
        entry["path"] = path
        return entry
    folder, root = Path(path).resolve(), output.resolve()
    entry["in_export"] = folder.is_relative_to(root)
    entry["path"] = folder.relative_to(root).as_posix() if entry["in_export"] else str(folder)
    return entry


def _save_backbone(backbone, output: Path, merge: bool, spec: BackboneSpec) -> tuple[str, dict]:
    """Writes the adapters (or the whole backbone) into ``output``; returns ``weights`` and the ``base_model``
    entry of ``lit_route.json``."""
    from peft import PeftModel

    if isinstance(backbone, PeftModel) and not merge:
        backbone.save_pretrained(output)
        base = _base_model_entry(spec, output)
        config_path = output / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = base["path"]
        config_path.write_text(json.dumps(config, indent=2))
        return "adapter", base
    model = backbone.merge_and_unload() if isinstance(backbone, PeftModel) else backbone
    model.save_pretrained(output)
    return ("merged" if isinstance(backbone, PeftModel) else "full"), _base_model_entry(spec, output)


def export_pm(ckpt: str | Path, output: str | Path, merge: bool = False) -> Path:
    """Exports a ``PreferenceModule`` checkpoint (see the module docstring)."""
    from safetensors.torch import save_file

    from lit_route.preference.io import load_preference_model

    module, encoder = load_preference_model(ckpt)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    hp = module.hparams
    weights, base = _save_backbone(module.backbone, output, merge, module.backbone_spec)
    save_file({k: v.detach().cpu().contiguous() for k, v in module.head.state_dict().items()}, output / HEAD_FILE)
    module.tokenizer.save_pretrained(output)
    head_kwargs = asdict(hp.sngp) if module.head_kind == "sngp" else {}
    config = {
        "kind": "preference_model",
        "weights": weights,  # adapter | merged | full
        "base_model": base,
        "backbone": asdict(module.backbone_spec),
        "head": {"kind": module.head_kind, "in_features": _hidden_size(module.backbone), **head_kwargs},
        "mode": module.mode,
        "pooling": module.pooling,
        "encoder": {"max_length": encoder.max_length, "template": encoder.template},
        "source_checkpoint": str(ckpt),
    }
    (output / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))
    return output


def _hidden_size(backbone) -> int:
    return backbone.config.get_text_config().hidden_size


def load_exported_pm(folder: str | Path, device: str = "cpu"):
    """An exported PM folder -> ``(PreferenceModule, PairEncoder)``, as ``load_preference_model`` returns them."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from lit_route.data.encoding import PairEncoder
    from lit_route.preference.module import PreferenceModule, SNGPConfig

    folder = Path(folder)
    config = json.loads((folder / EXPORT_CONFIG).read_text())
    if config.get("kind") != "preference_model":
        raise ValueError(f"{folder}: not an exported preference model (kind={config.get('kind')!r})")
    spec = BackboneSpec(**config["backbone"])
    if config["weights"] != "adapter":  # the folder holds the whole backbone
        spec = BackboneSpec(model_path=str(folder), dtype=spec.dtype)
    head = dict(config["head"])
    kind = head.pop("kind")
    head.pop("in_features")
    module = PreferenceModule(backbone=spec, lora=None, head=kind, sngp=SNGPConfig(**head) if kind == "sngp" else None,
                              freeze_backbone=True, mode=config["mode"], pooling=config.get("pooling", "last_token"))
    if config["weights"] == "adapter":
        module.backbone = PeftModel.from_pretrained(module.backbone, folder)
    # eval mode first: leaving train mode refreshes the spectral-norm estimate, which must come from the file
    module.eval()
    module.head.load_state_dict(load_file(folder / HEAD_FILE))
    module.requires_grad_(False).to(device)
    encoder = PairEncoder(module.tokenizer, config["encoder"]["max_length"], config["encoder"]["template"], module.mode)
    return module, encoder


def load_policy_checkpoint(ckpt: str | Path):
    """The policy of an ``RLOOPolicyModule`` checkpoint, rebuilt from its base model and trained tensors only
    (the reward PM it was trained against is not loaded)."""
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    hp = raw["hyper_parameters"]
    # a run built by LightningCLI (`rloo fit`) records its options as the config's dicts, one built in Python
    # (the Fabric engine, a script) as the dataclasses themselves
    spec = _as_spec(BackboneSpec, hp.get("policy")) or BackboneSpec()
    policy = load_backbone(spec, causal_lm=True)
    lora = _as_spec(LoraSpec, hp.get("lora"))
    if lora is not None:
        policy = apply_lora(policy, lora)
    state = {k[len("policy."):]: v for k, v in raw["state_dict"].items() if k.startswith("policy.")}
    trained = {n for n, p in policy.named_parameters() if p.requires_grad}
    missing = trained - set(state)
    if missing:
        raise KeyError(f"{ckpt}: lacks {len(missing)} trained policy tensors, e.g. {sorted(missing)[:3]}")
    policy.load_state_dict(state, strict=False)
    return policy.eval(), spec


def _as_spec(cls, value):
    """A recorded option as the dataclass ``cls``: a dict becomes one (unknown keys are an error), anything else
    (the dataclass, ``None``) is returned as it is."""
    return cls(**value) if isinstance(value, dict) else value


def export_policy(ckpt: str | Path, output: str | Path, merge: bool = False) -> Path:
    """Exports an ``RLOOPolicyModule`` checkpoint: adapters, or (``merge``) a plain causal-LM folder."""
    policy, spec = load_policy_checkpoint(ckpt)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    weights, base = _save_backbone(policy, output, merge, spec)
    load_tokenizer(spec).save_pretrained(output)
    config = {"kind": "policy", "weights": weights, "base_model": base,
              "backbone": asdict(spec), "source_checkpoint": str(ckpt)}
    (output / EXPORT_CONFIG).write_text(json.dumps(config, indent=2))
    return output


def export(ckpt: str, output_dir: str, merge: bool = False) -> dict:
    """Exports a lit-route checkpoint (preference model or RLOO policy) in ``save_pretrained`` form.

    Args:
        ckpt: A ``PreferenceModule`` (finalised, for uncertainties) or ``RLOOPolicyModule`` checkpoint.
        output_dir: The folder to write.
        merge: Merge the LoRA adapters into the base weights and save the whole model (for serving).
    """
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt: {ckpt} does not exist")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip and EOF errors all mean the same to a user
        raise ValueError(f"ckpt: {ckpt} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(raw, dict) or "lit_route" not in raw:
        raise ValueError(f"ckpt: {ckpt} is not a lit-route checkpoint (written by `pm fit` or `rloo fit`)")
    kind = "preference_model" if "head" in raw["lit_route"] else "policy"
    folder = (export_pm if kind == "preference_model" else export_policy)(path, output_dir, merge)
    config = json.loads((folder / EXPORT_CONFIG).read_text())
    summary = {"kind": kind, "weights": config["weights"], "output": str(folder),
               "files": sorted(p.name for p in folder.iterdir())}
    print(json.dumps(summary))
    return summary


def export_cli(args: list[str]) -> dict:
    """``lit-route export --ckpt CKPT --output_dir DIR [--merge true]``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="lit-route export", parser_mode="omegaconf", default_env=False,
                            description=export.__doc__.splitlines()[0])
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_function_arguments(export, as_positional=False)
    cfg = parser.parse_args(args)
    return export(**{k: v for k, v in cfg.as_dict().items() if k not in ("config", "__path__")})
