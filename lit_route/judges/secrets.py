"""API keys come from the environment or a secrets file, and nowhere else (never a config or a checkpoint)."""

from __future__ import annotations

import os
from pathlib import Path


def read_api_key(env: str, file: str | None, who: str, required: bool = True) -> str | None:
    """The key in ``$env``, else the first line of ``file``.

    Raises:
        RuntimeError: no key found and ``required``; the message names where it looked, never a value.
    """
    key = os.environ.get(env)
    if not key and file:
        path = Path(file).expanduser()
        if not path.exists():
            raise RuntimeError(f"{who}: api_key_file {path} does not exist")
        key = path.read_text().strip().splitlines()[0] if path.read_text().strip() else None
    if not key and required:
        raise RuntimeError(f"{who}: no API key: set the environment variable {env}" + (f" or fill {file}" if file else ""))
    return key
