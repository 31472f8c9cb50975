#!/usr/bin/env bash
# The CLI and config tests against the lowest and the newest jsonargparse that pyproject.toml allows. Each version
# is installed into a folder of its own and put first on PYTHONPATH: the virtual environment is left as it is.
#   tools/test_jsonargparse_bounds.sh                  (PYTHON=.venv/bin/python unless given; needs PyPI)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# the range as pyproject.toml states it, e.g. ">=4.51,<5"
range=$("$PYTHON" - <<'PY'
import re
from pathlib import Path

spec = re.search(r'"jsonargparse(?:\[[^\]]*\])?([^";]*)', Path("pyproject.toml").read_text())
print(spec.group(1).replace(" ", "") if spec else "")
PY
)
lowest=$(sed -nE 's/.*>=([0-9][0-9.]*).*/\1/p' <<<"$range")
if [[ -z "$lowest" ]]; then
    echo "pyproject.toml: the jsonargparse requirement ($range) states no lower bound (>=)" >&2
    exit 2
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for requirement in "jsonargparse==$lowest" "jsonargparse$range"; do
    target="$work/$(tr -c 'A-Za-z0-9.\n' _ <<<"$requirement")"
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$target" "$requirement"
    version=$(PYTHONPATH="$target" "$PYTHON" -c "import jsonargparse; print(jsonargparse.__version__)")
    echo "== jsonargparse $version ($requirement)"
    PYTHONPATH="$target:$PWD" "$PYTHON" -m pytest -q tests/test_cli_errors.py tests/test_configs.py || status=1
done
exit $status
