"""Artefacts: exporting checkpoints in ``save_pretrained`` form, and the provenance of results."""

from lit_route.artefacts.export import export, load_exported_pm, load_policy_checkpoint
from lit_route.artefacts.provenance import file_digest, provenance

__all__ = ["export", "file_digest", "load_exported_pm", "load_policy_checkpoint", "provenance"]
