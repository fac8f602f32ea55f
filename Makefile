# The two commands: `make run` (the main job on an embedded default) and `make test` (the suite).
# Both start with `install`, so they work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed
TINY := .cache/tiny-deepseek_v3

.PHONY: install run test lint typecheck unit bench clean proto

install: $(STAMP)

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

bench: install
	$(BIN)/python bench/offline.py

clean:
	rm -rf $(VENV) .cache
