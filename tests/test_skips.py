"""A skipped test says what it needs: every ``pytest.skip``, ``skipif`` and ``importorskip`` in tests/ gives a reason
that starts with "needs", and pytest lists the reasons of a run (``-rs``), so `make test` shows why each one was
skipped and what would run it."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPS = {"skip": 0, "skipif": None, "importorskip": None}  # the call, and the position of a positional reason


def skip_reasons(path: Path) -> list[tuple[int, str | None]]:
    """(line, the reason's literal text, with ``{...}`` for interpolations; None when none is given) of each skip
    call of a test file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SKIPS):
            continue
        base = node.func.value
        on_pytest = isinstance(base, ast.Name) and base.id == "pytest"
        on_mark = isinstance(base, ast.Attribute) and base.attr == "mark"
        if not (on_pytest or on_mark):
            continue
        reason = next((k.value for k in node.keywords if k.arg in ("reason", "msg")), None)
        position = SKIPS[node.func.attr]
        if reason is None and position is not None and len(node.args) > position:
            reason = node.args[position]
        text = None
        if isinstance(reason, ast.Constant):
            text = reason.value
        elif isinstance(reason, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{...}" for v in reason.values)
        found.append((node.lineno, text))
    return found


TEST_FILES = sorted(ROOT.glob("tests/*.py"))


def test_the_reason_reader_sees_each_form(tmp_path):
    sample = tmp_path / "test_sample.py"
    sample.write_text('import pytest\npytest.importorskip("trl")\npytestmark = pytest.mark.skipif(True, reason="gpu")\n'
                      'def test_a():\n    pytest.skip(f"needs {1} thing")\n'
                      'def test_b():\n    pytest.importorskip("x", reason="needs x")\n')
    assert skip_reasons(sample) == [(2, None), (3, "gpu"), (5, "needs {...} thing"), (7, "needs x")]


@pytest.mark.parametrize("path", TEST_FILES, ids=[p.name for p in TEST_FILES])
def test_every_skip_says_what_it_needs(path):
    vague = [(line, reason) for line, reason in skip_reasons(path) if not (reason or "").startswith("needs ")]
    assert not vague, f"{path.name}: skips without a reason that starts with 'needs': {vague}"


def test_pytest_lists_the_reasons_of_skipped_tests():
    addopts = re.search(r'^addopts = "(.*)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert "-rs" in shlex.split(addopts)
