"""Loading a preference-model checkpoint with the data settings it was trained with."""

from __future__ import annotations

from pathlib import Path

import torch

from lit_route.data.encoding import PairEncoder


def load_preference_model(ckpt: str | Path, device: str = "cpu"):
    """Loads a ``PreferenceModule`` checkpoint (base weights come from the recorded ``model_path``), or a
    folder written by ``lit-route export``.

    Returns:
        ``(module, encoder)``: the module in eval mode on ``device`` and a :class:`PairEncoder` with the
        ``max_length`` and ``template`` of training (from the checkpoint's datamodule hyperparameters).
    """
    from lit_route.preference.module import PreferenceModule

    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise FileNotFoundError(f"pm_ckpt: {ckpt} does not exist; train a PM first (`lit-route pm fit --config ...` "
                                "writes finalized.ckpt in its trainer.default_root_dir) or point pm_ckpt at one")
    if ckpt.is_dir():
        from lit_route.artefacts.export import load_exported_pm

        return load_exported_pm(ckpt, device)
    try:
        raw = torch.load(ckpt, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip and EOF errors all mean the same to a user
        raise ValueError(f"pm_ckpt: {ckpt} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(raw, dict) or "lit_route" not in raw or "state_dict" not in raw:
        raise ValueError(f"pm_ckpt: {ckpt} is not a lit-route preference-model checkpoint (written by `lit-route pm fit`)")
    # hparams hold the config dataclasses; the file is the user's own training output
    module = PreferenceModule.load_from_checkpoint(ckpt, map_location=device, weights_only=False)
    module.eval()
    data_hp = raw.get("datamodule_hyper_parameters", {})
    encoder = PairEncoder(module.tokenizer, data_hp.get("max_length", 1024), data_hp.get("template", "auto"),
                          module.mode)
    return module, encoder
