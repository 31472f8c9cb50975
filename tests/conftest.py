"""Shared fixtures: a tiny random Llama and a byte tokenizer, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest
import torch

from lit_route.models.tiny import build_byte_tokenizer, save_tiny_llama
from lit_route.types import PreferencePair

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(min(2, torch.get_num_threads()))


REPO = Path(__file__).resolve().parents[1]
# what a run writes into its folder; a test's run belongs under its tmp_path, not in the repository
RUN_OUTPUTS = ("judge_journal", "lightning_logs")


@pytest.fixture(autouse=True)
def _nothing_written_into_the_repository(request):
    before = {name for name in RUN_OUTPUTS if (REPO / name).exists()}
    yield
    new = [name for name in RUN_OUTPUTS if name not in before and (REPO / name).exists()]
    if new:
        import shutil

        for name in new:
            shutil.rmtree(REPO / name, ignore_errors=True)
        pytest.fail(f"{request.node.nodeid} wrote {', '.join(new)} into the repository (give its run a tmp_path)")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama and its byte tokenizer saved as an ordinary Hugging Face folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def byte_tokenizer():
    return build_byte_tokenizer()


@pytest.fixture
def toy_pairs() -> list[PreferencePair]:
    """Twelve short pairs where the chosen answer is the polite one."""
    out = []
    for i in range(12):
        out.append(
            PreferencePair(
                prompt=f"Question {i}: what is {i} plus {i}?",
                chosen=f"Thank you for asking! {i} plus {i} is {2 * i}.",
                rejected=f"{i + 1}?? whatever",
                subset="toy",
                id=f"toy-{i}",
            )
        )
    return out


def shared_file(*parts: str) -> Path:
    """A file of the shared real-data folder; the test is skipped where the folder does not exist."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path}: real benchmark samples in ../shared/data, a folder beside the repository that "
                    "only the project's own development machines and CI have (a clone never has it)")
    return path
