# The two commands: `make run` (the main job on an embedded default) and `make test` (the suite).
# Both start with `install`, so they work on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
STAMP := $(VENV)/.installed
TINY := .cache/tiny-qwen3

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

run: install
	test -f $(TINY)/config.json || $(BIN)/moe-cluster make-tiny --arch qwen3_moe --out $(TINY)
	$(BIN)/moe-cluster offline --model $(TINY) --max-tokens 24 \
	  --prompt "The quick brown fox" --prompt "Mixture of experts models route each token" \
	  --prompt "Once upon a time"

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
